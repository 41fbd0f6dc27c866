//! Link glue for the statically built tpm2-tss (see initramfs/build-cdeps.sh).
//!
//! tpm2-tss built with `--enable-nodl` has the TCTI loader call the device and swtpm
//! TCTIs directly, but its pkg-config file does not name them; they are added here.
//! Each TCTI archive also defines the dlopen entry point `Tss2_Tcti_Info`, which
//! nothing calls in a nodl build, so duplicate definitions of it are allowed.

fn main() {
    println!("cargo:rerun-if-env-changed=VG_CDEPS_LIB");
    let Ok(lib) = std::env::var("VG_CDEPS_LIB") else {
        panic!("VG_CDEPS_LIB is not set: build from the repository (see .cargo/config.toml)");
    };
    if !std::path::Path::new(&lib)
        .join("libtss2-tctildr.a")
        .exists()
    {
        panic!("{lib}/libtss2-tctildr.a is missing: run initramfs/build-cdeps.sh first");
    }
    // Record the C library versions for `vaultguard version`.
    for (pc, var) in [
        ("libcryptsetup", "VG_CRYPTSETUP_VERSION"),
        ("tss2-esys", "VG_TSS2_VERSION"),
        ("devmapper", "VG_DEVMAPPER_VERSION"),
    ] {
        let path = std::path::Path::new(&lib)
            .join("pkgconfig")
            .join(format!("{pc}.pc"));
        println!("cargo:rerun-if-changed={}", path.display());
        let version = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("Version:").map(|v| v.trim().to_string()))
            })
            .unwrap_or_else(|| "unknown".into());
        println!("cargo:rustc-env={var}={version}");
    }
    println!("cargo:rustc-link-search=native={lib}");
    println!("cargo:rustc-link-arg=-Wl,--allow-multiple-definition");
    // After the crate's own libraries, so that tctildr's references resolve.
    println!("cargo:rustc-link-arg={lib}/libtss2-tcti-device.a");
    println!("cargo:rustc-link-arg={lib}/libtss2-tcti-swtpm.a");
    println!("cargo:rustc-link-arg={lib}/libtss2-mu.a");
}
