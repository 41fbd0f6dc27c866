//! Every committed fuzz input, replayed through the fuzz targets' own bodies on
//! stable Rust in the ordinary `cargo test`: `fuzz/corpus/<target>/` (the
//! minimised corpus cargo fuzz starts from) and `fuzz/regressions/<target>/` (inputs
//! that once crashed a target, each kept with a unit test beside the parser it
//! broke). The bounded libFuzzer run itself is `fuzz/ci.sh`, run by `.ci/run`.

use std::path::{Path, PathBuf};

#[path = "../fuzz/bodies.rs"]
mod bodies;

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Replay `kind/<target>/*` and return how many inputs there were. A panic names
/// the input that caused it.
fn replay(kind: &str, target: &str, body: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let files = inputs(&dir);
    for f in &files {
        let data = std::fs::read(f).unwrap();
        if let Err(e) = std::panic::catch_unwind(|| body(&data)) {
            let why = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{target} panics on {}: {why}", f.display());
        }
    }
    files.len()
}

#[test]
fn every_committed_input_runs_through_its_target() {
    for (target, body) in bodies::TARGETS {
        let n = replay("corpus", target, body);
        // An empty or missing corpus would make this test pass for nothing.
        assert!(
            n >= 10,
            "fuzz/corpus/{target} holds {n} inputs; expected the committed corpus"
        );
        replay("regressions", target, body);
    }
}

#[test]
fn every_target_has_a_corpus_folder_and_a_fuzz_target() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (target, _) in bodies::TARGETS {
        assert!(
            fuzz.join("corpus").join(target).is_dir(),
            "fuzz/corpus/{target}"
        );
        assert!(
            fuzz.join("fuzz_targets")
                .join(format!("{target}.rs"))
                .is_file(),
            "fuzz/fuzz_targets/{target}.rs"
        );
    }
}
