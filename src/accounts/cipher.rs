//! Users' own provider keys (BYOK), sealed with AES-256-GCM under
//! `byok.encryption_key` before they reach PostgreSQL.
//!
//! A sealed key is `version (1 byte) || nonce (12 bytes) || ciphertext || tag`,
//! with a fresh random nonce each time. The account and the provider are
//! bound as associated data, so a sealed key copied to another user or
//! column does not open. A wrong encryption key fails the tag check: it is
//! an error, never garbage.

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use crate::config::ByokSettings;
use crate::ledger::AccountId;
use crate::pricing::Provider;

const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const KEY_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CipherError {
    #[error("the stored key is not in a format this service wrote")]
    Format,
    #[error(
        "the stored key does not decrypt under byok.encryption_key \
         (the encryption key changed, or the value was altered)"
    )]
    Authentication,
    #[error("encryption failed")]
    Encrypt,
}

/// Seals and opens BYOK keys.
#[derive(Clone)]
pub struct KeyCipher {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for KeyCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyCipher(***)")
    }
}

impl KeyCipher {
    /// The cipher of `byok.encryption_key`; `None` when it is empty.
    pub fn from_settings(settings: &ByokSettings) -> Result<Option<KeyCipher>, String> {
        let text = settings.encryption_key.expose().trim();
        if text.is_empty() {
            return Ok(None);
        }
        let bytes = STANDARD
            .decode(text)
            .map_err(|_| "must be standard base64 (openssl rand -base64 32)".to_string())?;
        KeyCipher::from_bytes(&bytes).map(Some)
    }

    /// A cipher from the 32 raw key bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<KeyCipher, String> {
        if bytes.len() != KEY_LEN {
            return Err(format!(
                "must decode to {KEY_LEN} bytes, not {}",
                bytes.len()
            ));
        }
        Ok(KeyCipher {
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(bytes)),
        })
    }

    pub fn seal(
        &self,
        account: AccountId,
        provider: Provider,
        plaintext: &str,
    ) -> Result<Vec<u8>, CipherError> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = associated_data(account, provider);
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| CipherError::Encrypt)?;
        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
        sealed.push(VERSION);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        Ok(sealed)
    }

    pub fn open(
        &self,
        account: AccountId,
        provider: Provider,
        sealed: &[u8],
    ) -> Result<String, CipherError> {
        let (version, rest) = sealed.split_first().ok_or(CipherError::Format)?;
        if *version != VERSION || rest.len() < NONCE_LEN {
            return Err(CipherError::Format);
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let aad = associated_data(account, provider);
        let plaintext = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| CipherError::Authentication)?;
        String::from_utf8(plaintext).map_err(|_| CipherError::Format)
    }
}

fn associated_data(account: AccountId, provider: Provider) -> Vec<u8> {
    format!(
        "creditd:byok:v{VERSION}:{}:{}",
        provider.as_str(),
        account.0
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher(byte: u8) -> KeyCipher {
        KeyCipher::from_bytes(&[byte; KEY_LEN]).unwrap()
    }

    #[test]
    fn a_sealed_key_opens_to_the_same_text_and_never_contains_it() {
        let key = "sk-ant-api03-abcdefghijklmnopqrstuvwxyz";
        let sealed = cipher(7)
            .seal(AccountId(1), Provider::Anthropic, key)
            .unwrap();
        assert!(!sealed.windows(key.len()).any(|w| w == key.as_bytes()));
        let opened = cipher(7).open(AccountId(1), Provider::Anthropic, &sealed);
        assert_eq!(opened.as_deref(), Ok(key));
    }

    #[test]
    fn every_seal_uses_a_fresh_nonce() {
        let a = cipher(7)
            .seal(AccountId(1), Provider::Openai, "sk-x")
            .unwrap();
        let b = cipher(7)
            .seal(AccountId(1), Provider::Openai, "sk-x")
            .unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn a_wrong_key_another_account_or_provider_fails_instead_of_returning_garbage() {
        let sealed = cipher(7)
            .seal(AccountId(1), Provider::Openai, "sk-x")
            .unwrap();
        assert_eq!(
            cipher(8).open(AccountId(1), Provider::Openai, &sealed),
            Err(CipherError::Authentication)
        );
        assert_eq!(
            cipher(7).open(AccountId(2), Provider::Openai, &sealed),
            Err(CipherError::Authentication)
        );
        assert_eq!(
            cipher(7).open(AccountId(1), Provider::Anthropic, &sealed),
            Err(CipherError::Authentication)
        );
        assert_eq!(
            cipher(7).open(AccountId(1), Provider::Openai, b"plain"),
            Err(CipherError::Format)
        );
    }

    #[test]
    fn the_encryption_key_must_be_32_bytes_of_base64() {
        let settings = |text: &str| ByokSettings {
            encryption_key: crate::config::Secret::new(text),
        };
        assert!(KeyCipher::from_settings(&settings("")).unwrap().is_none());
        assert!(KeyCipher::from_settings(&settings("not base64!")).is_err());
        assert!(KeyCipher::from_settings(&settings(&STANDARD.encode([1u8; 16]))).is_err());
        assert!(
            KeyCipher::from_settings(&settings(&STANDARD.encode([1u8; 32])))
                .unwrap()
                .is_some()
        );
    }
}
