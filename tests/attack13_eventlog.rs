//! Attack on the enrolment's event-log record (issue 13): a firmware log whose
//! records describe themselves at length (a UEFI variable with a long name) or
//! are many, as a real machine's PCR 7 can be. The enrolment copied every
//! record's description into the token, where the parser allows 256 bytes per
//! description and 512 records per PCR, and the LUKS2 header's JSON area is a
//! few KiB: the enrolment wrote a token that could not be read back (the TPM
//! path was dead from then on) or did not fit. (Its own test binary: it points
//! VAULTGUARD_EVENT_LOG at its log.)

mod common;

use common::{enroll_opts, luks_image, unlock_opts, Swtpm, TempDir};
use vaultguard::boot::{acquire_volume_key, enroll, Method, NoEvents};
use vaultguard::luks::Vault;
use vaultguard::prompt::Scripted;
use vaultguard::tpm::eventlog::{self, EV_EFI_VARIABLE_DRIVER_CONFIG};
use vaultguard::tpm::policy::Bank;

const PASS: &str = "attack13 eventlog passphrase";
const LOG: &[u8] = include_bytes!("../src/tpm/testdata/ovmf-direct-boot.eventlog");

/// One TCG_PCR_EVENT2 record for `pcr`: an EV_EFI_VARIABLE_DRIVER_CONFIG of a
/// variable named `name`, with a digest in every bank the log declares (SHA-256
/// the data's, as firmware measures it; the others are not replayed here).
fn variable_event(algs: &[(u16, u16)], pcr: u32, name: &str) -> Vec<u8> {
    let mut data = vec![0x5Au8; 16]; // vendor GUID
    let units: Vec<u16> = name.encode_utf16().collect();
    data.extend_from_slice(&(units.len() as u64).to_le_bytes());
    data.extend_from_slice(&1u64.to_le_bytes());
    for u in &units {
        data.extend_from_slice(&u.to_le_bytes());
    }
    data.push(1);
    let mut e = Vec::new();
    e.extend_from_slice(&pcr.to_le_bytes());
    e.extend_from_slice(&EV_EFI_VARIABLE_DRIVER_CONFIG.to_le_bytes());
    e.extend_from_slice(&(algs.len() as u32).to_le_bytes());
    for &(alg, len) in algs {
        e.extend_from_slice(&alg.to_le_bytes());
        if alg == Bank::Sha256.alg_id() {
            e.extend_from_slice(&Bank::Sha256.hash(&[&data]));
        } else {
            e.extend_from_slice(&vec![0u8; len as usize]);
        }
    }
    e.extend_from_slice(&(data.len() as u32).to_le_bytes());
    e.extend_from_slice(&data);
    e
}

#[test]
fn long_or_many_records_give_a_token_that_reads_back_and_opens() {
    let mut sw = Swtpm::start();
    let dir = TempDir::new("attack13-eventlog");
    let img = luks_image(dir.path(), PASS);
    let algs = eventlog::parse(LOG).unwrap().algs;
    let mut log = LOG.to_vec();
    // One variable whose name alone is longer than a description may be...
    log.extend(variable_event(&algs, 7, &"LongVariableName".repeat(20)));
    // ...and many ordinary ones (a machine with a full db/dbx/KEK history).
    for i in 0..60 {
        log.extend(variable_event(
            &algs,
            7,
            &format!("db{i:03}-{}", "x".repeat(40)),
        ));
    }
    assert!(eventlog::parse(&log).unwrap().events.len() > 60);
    let log_file = dir.path().join("binary_bios_measurements");
    std::fs::write(&log_file, &log).unwrap();
    std::env::set_var("VAULTGUARD_EVENT_LOG", &log_file);
    common::replay_eventlog(&mut sw, &log);

    let mut o = enroll_opts(&sw, &img);
    o.pcrs = vec![7, 9];
    enroll(&o, &mut Scripted::new(&[PASS]), &mut NoEvents).expect("enrolment");
    let mut v = Vault::open(img.to_str().unwrap()).unwrap();
    let tokens = v.tpm2_tokens();
    assert_eq!(tokens.len(), 1);
    let token = match &tokens[0].1 {
        Ok(t) => t,
        Err(e) => panic!("the enrolment wrote a token it cannot read back: {e}"),
    };
    // Whatever was kept fits the token's own limits; PCR 9 (small) is kept whole.
    for (pcr, records) in &token.eventlog {
        assert!(records.len() <= 512, "PCR {pcr}");
        for (text, _) in records {
            assert!(text.len() <= 256, "PCR {pcr}: {} bytes", text.len());
        }
    }
    let parsed = eventlog::parse(&log).unwrap();
    assert_eq!(token.eventlog[&9], parsed.digest_list(Bank::Sha256, 9));
    // And the TPM path works.
    let got = acquire_volume_key(
        &mut v,
        &unlock_opts(&sw, &img),
        &mut Scripted::new(&[PASS]),
        &mut NoEvents,
    )
    .unwrap();
    assert_eq!(got.method, Method::Tpm2);
}
