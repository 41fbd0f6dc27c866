//! Object templates: the SRK (both systemd generations), the sealed data object,
//! and the check that what sits at the SRK handle is a storage key. Pure
//! functions over tss-esapi structures; no TPM is asked.

use super::error::SrkDefect;
use super::{cmd, PrimaryAlg, TpmError};

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::structures::{
    Digest, EccPoint, EccScheme, KeyDerivationFunctionScheme, KeyedHashScheme, Public,
    PublicBuilder, PublicEccParametersBuilder, PublicKeyRsa, PublicKeyedHashParameters,
    PublicRsaParametersBuilder, RsaExponent, RsaScheme, SymmetricDefinitionObject,
};

pub(super) fn check_storage_key(public: &Public) -> Result<(), TpmError> {
    let attrs = public.object_attributes();
    if !(attrs.restricted() && attrs.decrypt() && !attrs.sign_encrypt() && attrs.fixed_tpm()) {
        return Err(TpmError::SrkUnusable(SrkDefect::NotStorageKey));
    }
    if !matches!(public, Public::Ecc { .. } | Public::Rsa { .. }) {
        return Err(TpmError::SrkUnusable(SrkDefect::NotRsaOrEcc));
    }
    Ok(())
}

/// The SRK templates systemd uses: `new_style` is the TCG provisioning-guidance
/// template (with noDA), the other the one systemd < 254 derived each time.
pub fn srk_template(alg: PrimaryAlg, new_style: bool) -> Result<Public, TpmError> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(true)
        .with_decrypt(true)
        .with_no_da(new_style)
        .build()
        .map_err(cmd("SRK attributes"))?;
    let builder = PublicBuilder::new()
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs);
    let public = match alg {
        PrimaryAlg::Ecc => builder
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new()
                    .with_symmetric(SymmetricDefinitionObject::AES_128_CFB)
                    .with_ecc_scheme(EccScheme::Null)
                    .with_curve(EccCurve::NistP256)
                    .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                    .with_is_signing_key(false)
                    .with_is_decryption_key(true)
                    .with_restricted(true)
                    .build()
                    .map_err(cmd("SRK ECC parameters"))?,
            )
            .with_ecc_unique_identifier(EccPoint::default())
            .build(),
        PrimaryAlg::Rsa => builder
            .with_public_algorithm(PublicAlgorithm::Rsa)
            .with_rsa_parameters(
                PublicRsaParametersBuilder::new()
                    .with_symmetric(SymmetricDefinitionObject::AES_128_CFB)
                    .with_scheme(RsaScheme::Null)
                    .with_key_bits(RsaKeyBits::Rsa2048)
                    .with_exponent(RsaExponent::default())
                    .with_is_signing_key(false)
                    .with_is_decryption_key(true)
                    .with_restricted(true)
                    .build()
                    .map_err(cmd("SRK RSA parameters"))?,
            )
            .with_rsa_unique_identifier(PublicKeyRsa::default())
            .build(),
    };
    public.map_err(cmd("SRK template"))
}

/// The sealed data object: keyed hash, policy-only authorisation (no userWithAuth),
/// noDA unless a PIN is set so that power cuts never count against the TPM's
/// dictionary-attack budget; with a PIN, wrong guesses must count.
pub(super) fn sealed_template(policy: &[u8], pin: bool) -> Result<Public, TpmError> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_no_da(!pin)
        .build()
        .map_err(cmd("sealed attributes"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_auth_policy(Digest::try_from(policy.to_vec()).map_err(cmd("policy digest"))?)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::try_from(vec![0u8; 32]).map_err(cmd("unique"))?)
        .build()
        .map_err(cmd("sealed template"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_srk_templates_are_storage_keys_and_differ_only_in_no_da() {
        for alg in [PrimaryAlg::Ecc, PrimaryAlg::Rsa] {
            let new = srk_template(alg, true).unwrap();
            let old = srk_template(alg, false).unwrap();
            assert!(check_storage_key(&new).is_ok());
            assert!(check_storage_key(&old).is_ok());
            let (n, o) = (new.object_attributes(), old.object_attributes());
            assert!(n.no_da() && !o.no_da());
            assert!(n.user_with_auth() && n.fixed_tpm() && n.fixed_parent());
            assert!(n.sensitive_data_origin() && !n.sign_encrypt());
        }
        assert!(matches!(
            srk_template(PrimaryAlg::Ecc, true).unwrap(),
            Public::Ecc { .. }
        ));
        assert!(matches!(
            srk_template(PrimaryAlg::Rsa, true).unwrap(),
            Public::Rsa { .. }
        ));
    }

    #[test]
    fn the_sealed_object_is_policy_only_and_no_da_without_a_pin() {
        let policy = [0x5a; 32];
        let plain = sealed_template(&policy, false).unwrap();
        let pinned = sealed_template(&policy, true).unwrap();
        // Power cuts never count against the DA budget; wrong PINs must.
        assert!(plain.object_attributes().no_da());
        assert!(!pinned.object_attributes().no_da());
        for t in [&plain, &pinned] {
            let a = t.object_attributes();
            // Only the policy authorises it: no password use of the object.
            assert!(!a.user_with_auth() && !a.admin_with_policy());
            assert!(a.fixed_tpm() && a.fixed_parent());
            match t {
                Public::KeyedHash { auth_policy, .. } => {
                    assert_eq!(auth_policy.value(), policy)
                }
                _ => panic!("not a keyed-hash object"),
            }
            // A sealed object is no storage key: it can never pass for the SRK.
            assert!(matches!(
                check_storage_key(t),
                Err(TpmError::SrkUnusable(SrkDefect::NotStorageKey))
            ));
        }
    }
}
