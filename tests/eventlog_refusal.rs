//! The refusal explained from the event log, on a software TPM and a LUKS2 file:
//! swtpm is extended with a real OVMF log's records (so the log replays), the
//! enrolment keeps each sealed PCR's records in the token, then a "reboot" into a
//! tampered initrd (the same records, another initrd digest, and the log that
//! says so) makes the TPM refuse: the console and the audit event name PCR 9 and
//! the initrd record with its old and new digest, and the passphrase opens it.
//! (Its own test binary: it points VAULTGUARD_EVENT_LOG at its logs.)

mod common;

use common::{enroll_opts, luks_image, unlock_opts, Swtpm, TempDir};
use vaultguard::boot::{acquire_volume_key, enroll, Events, Method, NoEvents};
use vaultguard::encoding::hex_encode;
use vaultguard::luks::Vault;
use vaultguard::prompt::Scripted;
use vaultguard::tpm::eventlog::{self, TAG_LINUX_INITRD};
use vaultguard::tpm::policy::Bank;

const PASS: &str = "correct horse battery staple";
const LOG: &[u8] = include_bytes!("../src/tpm/testdata/ovmf-direct-boot.eventlog");

#[derive(Default)]
struct Recorded(Vec<(String, Vec<(String, String)>)>);

impl Events for Recorded {
    fn event(&mut self, name: &str, fields: &[(&str, &str)]) {
        self.0.push((
            name.into(),
            fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ));
    }
}

#[test]
fn a_tampered_initrd_is_named_with_pcr_9_and_its_digests_and_the_passphrase_opens() {
    let mut sw = Swtpm::start();
    let dir = TempDir::new("refusal");
    let img = luks_image(dir.path(), PASS);
    let log_file = dir.path().join("binary_bios_measurements");
    std::fs::write(&log_file, LOG).unwrap();
    std::env::set_var("VAULTGUARD_EVENT_LOG", &log_file);
    common::replay_eventlog(&mut sw, LOG);

    let mut o = enroll_opts(&sw, &img);
    o.pcrs = vec![7, 9];
    enroll(&o, &mut Scripted::new(&[PASS]), &mut NoEvents).unwrap();
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let token = v.tpm2_tokens().remove(0).1.unwrap();
    let parsed = eventlog::parse(LOG).unwrap();
    assert_eq!(
        token.eventlog.keys().copied().collect::<Vec<_>>(),
        [7, 9],
        "the enrolment recorded the sealed PCRs' records (not the phase PCR)"
    );
    assert_eq!(token.eventlog[&9], parsed.digest_list(Bank::Sha256, 9));

    // Reboot into a tampered initrd: the log now carries its digest.
    let old = parsed
        .events
        .iter()
        .find(|e| e.tag_id() == Some(TAG_LINUX_INITRD))
        .unwrap()
        .digest(Bank::Sha256)
        .unwrap()
        .to_vec();
    let new = Bank::Sha256.hash(&[b"an initrd nobody enrolled"]);
    let at = LOG.windows(32).position(|w| w == old.as_slice()).unwrap();
    let mut tampered = LOG.to_vec();
    tampered[at..at + 32].copy_from_slice(&new);
    std::fs::write(&log_file, &tampered).unwrap();
    sw.restart();
    common::replay_eventlog(&mut sw, &tampered);

    let mut p = Scripted::new(&[PASS]);
    let mut events = Recorded::default();
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let got = acquire_volume_key(&mut v, &unlock_opts(&sw, &img), &mut p, &mut events).unwrap();
    assert_eq!(got.method, Method::Passphrase);
    let want = format!(
        "vaultguard:   PCR 9: EV_EVENT_TAG tag 0x8F3B22EC \"Linux initrd\": {} -> {}",
        hex_encode(&old),
        hex_encode(&new)
    );
    assert!(p.said.iter().any(|l| l == &want), "{want}\n{:#?}", p.said);
    assert!(
        p.said.iter().any(|l| l.contains("PCR 9 changed")),
        "{:#?}",
        p.said
    );
    // Only the initrd record is named: PCR 7 did not change.
    assert_eq!(p.said.iter().filter(|l| l.contains("  PCR ")).count(), 1);
    let (_, fields) = events
        .0
        .iter()
        .find(|(n, _)| n == "tpm_refused")
        .expect("a tpm_refused event");
    let diff = &fields.iter().find(|(k, _)| k == "eventlog_diff").unwrap().1;
    assert_eq!(format!("vaultguard:   {diff}"), want);
}
