//! Encryption at rest: [`SealedTarget`] seals every object (bundles and
//! manifests alike) with AES-256-GCM (RustCrypto's `aes-gcm`; the key id,
//! the name ids and the nonces come from ring, already in the tree for TLS)
//! before it reaches the store, and opens and verifies it on the way back.
//!
//! Object format:
//!
//! ```text
//! "FRYE" | version 1 | key id (8) | nonce (12) | ciphertext | tag (16)
//! ```
//!
//! - The nonce is fresh from the OS random source for every put (a retried
//!   put of the same key seals again with a new one). With 96-bit random
//!   nonces a key is good for far more than 2^32 objects before a repeat
//!   becomes likely enough to matter (NIST SP 800-38D's bound).
//! - The associated data is the header and the object's full key (host
//!   prefix included), so an object copied or moved to another key, or to
//!   another host's tree, fails to open.
//! - The key id (8 bytes of SHA-256 over a label and the key) tells a wrong
//!   key apart from a damaged object without revealing the key: a wrong key
//!   is non-recoverable with that message, a failed tag is corruption
//!   naming the object.
//! - Bundles are compressed before they are put, so before they are sealed.
//! - Keys reveal only ids: a VM's and a disk's name appear in keys as
//!   [`TargetStore::name_segment`], `i` and 32 hex digits of HMAC-SHA256
//!   under a key derived from the encryption key. The same name gives the
//!   same id (a restore finds a VM by name), another key another id, and
//!   the id says nothing of the name. The names themselves are only in
//!   the sealed manifests.
//!
//! The same wrapper runs with no key: it then refuses sealed objects ("the
//! replica is encrypted: configure its key") instead of handing ciphertext
//! on as a corrupt bundle, and with a key it refuses plain objects ("the
//! replica was written without encryption").

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use bytes::Bytes;
use futures::future::BoxFuture;
use ring::rand::{SecureRandom, SystemRandom};

use super::{Target, TargetStore};
use crate::error::{Error, ErrorClass, Result};

const MAGIC: &[u8; 4] = b"FRYE";
const VERSION: u8 = 1;
const KEY_ID_LEN: usize = 8;
const NONCE_LEN: usize = 12;
/// Magic, version, key id, nonce.
pub const HEADER_LEN: usize = 4 + 1 + KEY_ID_LEN + NONCE_LEN;
pub const TAG_LEN: usize = 16;

/// A 256-bit key. `Debug` shows only its id.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptionKey([u8; 32]);

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncryptionKey(id {})", hex(&self.id()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl EncryptionKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        EncryptionKey(bytes)
    }

    /// A key as text: 64 hex digits (surrounding white space ignored).
    pub fn from_hex(text: &str) -> Result<Self> {
        let t = text.trim();
        let bad = || Error::invalid("encryption key", "expected 32 bytes, or 64 hex digits");
        if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(EncryptionKey(key))
    }

    /// A key file: exactly 32 bytes (e.g. `head -c 32 /dev/urandom`), or 64
    /// hex digits and an optional newline.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).map_err(|e| Error::io(format!("reading encryption key file {}", path.display()), e))?;
        if let Ok(raw) = <[u8; 32]>::try_from(bytes.as_slice()) {
            if raw.iter().all(|b| b.is_ascii_hexdigit()) {
                // `openssl rand -hex 16`: 16 bytes of key, not 32.
                return Err(Error::invalid(
                    "encryption key file",
                    format!(
                        "{}: 32 hex digits are only 16 bytes; give 32 random bytes or 64 hex digits",
                        path.display()
                    ),
                ));
            }
            return Ok(EncryptionKey(raw));
        }
        let text = std::str::from_utf8(&bytes).unwrap_or("");
        EncryptionKey::from_hex(text).map_err(|_| {
            Error::invalid(
                "encryption key file",
                format!("{}: {} bytes; expected 32 bytes, or 64 hex digits", path.display(), bytes.len()),
            )
        })
    }

    /// [`EncryptionKey::id`] in hex, as the state store and messages show it.
    pub fn id_hex(&self) -> String {
        hex(&self.id())
    }

    /// What objects carry to name their key without revealing it.
    pub fn id(&self) -> [u8; KEY_ID_LEN] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"ferry encryption key id v1\0");
        ctx.update(&self.0);
        let digest = ctx.finish();
        digest.as_ref()[..KEY_ID_LEN].try_into().expect("SHA-256 is longer than a key id")
    }
}

struct Sealer {
    key: Aes256Gcm,
    id: [u8; KEY_ID_LEN],
    /// Names to key segments (derived from the key, never the key itself).
    names: ring::hmac::Key,
}

/// Encrypts on the way in, opens and verifies on the way out ([module
/// docs](self)); with no key, refuses encrypted objects.
pub struct SealedTarget {
    inner: Target,
    sealer: Option<Sealer>,
    rng: SystemRandom,
}

impl SealedTarget {
    pub fn new(inner: Target, key: Option<&EncryptionKey>) -> Arc<SealedTarget> {
        let sealer = key.map(|k| {
            let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k.0);
            let names = ring::hmac::sign(&derive, b"ferry object key names v1");
            Sealer {
                key: Aes256Gcm::new(&k.0.into()),
                id: k.id(),
                names: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, names.as_ref()),
            }
        });
        Arc::new(SealedTarget { inner, sealer, rng: SystemRandom::new() })
    }

    fn seal(&self, sealer: &Sealer, key: &str, plain: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| Error::Internal("the OS random source failed".into()))?;
        let mut out = Vec::with_capacity(HEADER_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&sealer.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let aad = [&out[..HEADER_LEN], key.as_bytes()].concat();
        let tag = sealer
            .key
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut out[HEADER_LEN..])
            .map_err(|_| Error::Internal(format!("sealing {key} failed")))?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    fn open(&self, key: &str, stored: Bytes) -> Result<Bytes> {
        let sealed = stored.len() >= 5 && &stored[..4] == MAGIC;
        let refuse = |why: String| Error::Corrupt {
            what: format!("target object {key}"),
            reason: why,
            class: ErrorClass::NonRecoverable,
        };
        let Some(sealer) = &self.sealer else {
            if sealed {
                return Err(refuse(
                    "it is encrypted, and no encryption key is configured: give the replica's key".into(),
                ));
            }
            return Ok(stored);
        };
        if !sealed {
            return Err(refuse(
                "it is not encrypted: the replica was written without encryption, and an encryption key is configured"
                    .into(),
            ));
        }
        if stored[4] != VERSION {
            return Err(refuse(format!("unknown encryption format version {}", stored[4])));
        }
        if stored.len() < HEADER_LEN + TAG_LEN {
            return Err(Error::corrupt(format!("target object {key}"), "cut short: no room for its tag"));
        }
        let id = &stored[5..5 + KEY_ID_LEN];
        if id != sealer.id {
            return Err(refuse(format!(
                "wrong encryption key: the object was sealed with key id {}, the configured key is {}",
                hex(id),
                hex(&sealer.id)
            )));
        }
        let nonce = Nonce::from_slice(&stored[5 + KEY_ID_LEN..HEADER_LEN]);
        let aad = [&stored[..HEADER_LEN], key.as_bytes()].concat();
        let tag_at = stored.len() - TAG_LEN;
        let tag = Tag::from_slice(&stored[tag_at..]);
        let mut body = stored[HEADER_LEN..tag_at].to_vec();
        sealer.key.decrypt_in_place_detached(nonce, &aad, &mut body, tag).map_err(|_| {
            Error::corrupt(
                format!("target object {key}"),
                "authentication failed: the object was tampered with, damaged, or moved from another key",
            )
        })?;
        Ok(Bytes::from(body))
    }
}

impl TargetStore for SealedTarget {
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let data = match &self.sealer {
                Some(s) => {
                    super::check_key(key)?;
                    Bytes::from(self.seal(s, key, &data)?)
                }
                None => data,
            };
            self.inner.put(key, data).await
        })
    }
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Bytes>> {
        Box::pin(async move {
            let stored = self.inner.get(key).await?;
            self.open(key, stored)
        })
    }
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>>> {
        self.inner.list(prefix)
    }
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        self.inner.delete(key)
    }
    fn describe(&self) -> String {
        match &self.sealer {
            Some(_) => format!("{} (encrypted)", self.inner.describe()),
            None => self.inner.describe(),
        }
    }
    fn name_segment(&self, name: &str) -> String {
        match &self.sealer {
            Some(s) => format!("i{}", hex(&ring::hmac::sign(&s.names, name.as_bytes()).as_ref()[..16])),
            None => self.inner.name_segment(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::{contract, LocalTarget};

    fn key(b: u8) -> EncryptionKey {
        EncryptionKey::from_bytes([b; 32])
    }

    fn local(dir: &Path) -> Target {
        Arc::new(LocalTarget::open(dir.join("t")).unwrap())
    }

    #[test]
    fn names_become_ids_that_depend_on_the_key_and_reveal_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let raw: Target = Arc::new(LocalTarget::open(dir.path()).unwrap());
        let (a, b) = (SealedTarget::new(raw.clone(), Some(&key(1))), SealedTarget::new(raw.clone(), Some(&key(2))));
        let id = a.name_segment("payroll");
        assert_eq!(id, a.name_segment("payroll"), "the same name, the same id: a restore finds it");
        assert_ne!(id, a.name_segment("payroll2"));
        assert_ne!(id, b.name_segment("payroll"), "another key, another id");
        assert!(id.len() == 33 && id.starts_with('i') && id[1..].bytes().all(|c| c.is_ascii_hexdigit()), "{id}");
        super::super::check_key(&format!("vms/{id}/1")).unwrap();
        // Without a key, names are keys.
        assert_eq!(SealedTarget::new(raw, None).name_segment("payroll"), "payroll");
    }

    /// The format is standard AES-256-GCM: an object sealed by ring (the
    /// AEAD of earlier versions) opens, so replicas written before the
    /// switch to RustCrypto stay restorable, and a GCM test vector holds.
    #[tokio::test]
    async fn objects_are_standard_aes_256_gcm() {
        use ring::aead::{Aad, LessSafeKey, Nonce as RingNonce, UnboundKey, AES_256_GCM};
        // NIST GCM test case 14 (gcmEncryptExtIV256): zero key, zero nonce, one zero block.
        let c = Aes256Gcm::new(&[0u8; 32].into());
        let mut block = [0u8; 16];
        let tag = c.encrypt_in_place_detached(Nonce::from_slice(&[0u8; 12]), b"", &mut block).unwrap();
        assert_eq!(hex(&block), "cea7403d4d606b6e074ec5d3baf39d18");
        assert_eq!(hex(&tag), "d0d1c8a799996bf0265b98b5d48ab919");

        let dir = tempfile::tempdir().unwrap();
        let raw = local(dir.path());
        let k = key(9);
        let name = "vms/a/1/points/0000000003.manifest";
        let nonce = [7u8; 12];
        let mut old = Vec::new();
        old.extend_from_slice(MAGIC);
        old.push(VERSION);
        old.extend_from_slice(&k.id());
        old.extend_from_slice(&nonce);
        let aad = [&old[..HEADER_LEN], name.as_bytes()].concat();
        let mut body = b"sealed by ring".to_vec();
        let ring_key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k.0).unwrap());
        ring_key.seal_in_place_append_tag(RingNonce::assume_unique_for_key(nonce), Aad::from(aad), &mut body).unwrap();
        old.extend_from_slice(&body);
        raw.put(name, Bytes::from(old)).await.unwrap();
        let sealed = SealedTarget::new(raw, Some(&k));
        assert_eq!(&sealed.get(name).await.unwrap()[..], b"sealed by ring");
    }

    #[tokio::test]
    async fn sealed_targets_meet_the_contract_and_store_no_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let raw = local(dir.path());
        let sealed = SealedTarget::new(raw.clone(), Some(&key(7)));
        contract::run_contract(sealed.as_ref()).await;
        let secret = b"a block of the guest's data that must never reach the store in clear".repeat(20);
        sealed.put("vms/a/1/disks/d/p0000000002/000000", Bytes::from(secret.clone())).await.unwrap();
        let stored = raw.get("vms/a/1/disks/d/p0000000002/000000").await.unwrap();
        assert_eq!(stored.len(), secret.len() + HEADER_LEN + TAG_LEN);
        assert!(!stored.windows(32).any(|w| secret.windows(32).any(|s| s == w)), "plaintext in the stored object");
        // Same bytes, same key: a fresh nonce each time.
        sealed.put("vms/a/1/disks/d/p0000000002/000001", Bytes::from(secret.clone())).await.unwrap();
        assert_ne!(stored, raw.get("vms/a/1/disks/d/p0000000002/000001").await.unwrap());
        assert!(sealed.describe().ends_with("(encrypted)"));
    }

    #[tokio::test]
    async fn tampering_moving_a_wrong_key_and_a_mismatched_replica_are_each_named() {
        let dir = tempfile::tempdir().unwrap();
        let raw = local(dir.path());
        let sealed = SealedTarget::new(raw.clone(), Some(&key(7)));
        let k = "vms/a/1/points/0000000001.manifest";
        sealed.put(k, Bytes::from_static(b"{\"manifest\": 1}")).await.unwrap();
        let stored = raw.get(k).await.unwrap();

        // One flipped byte anywhere after the header: corrupt, naming the object.
        for at in [HEADER_LEN, stored.len() - 1, HEADER_LEN - 1] {
            let mut bad = stored.to_vec();
            bad[at] ^= 0x40;
            raw.put(k, Bytes::from(bad)).await.unwrap();
            let e = sealed.get(k).await.unwrap_err();
            assert!(e.to_string().contains(k) && e.to_string().contains("authentication failed"), "{at}: {e}");
        }
        // Moved to another key: fails to open.
        raw.put("vms/a/1/points/0000000002.manifest", stored.clone()).await.unwrap();
        let e = sealed.get("vms/a/1/points/0000000002.manifest").await.unwrap_err();
        assert!(e.to_string().contains("authentication failed"), "{e}");
        raw.put(k, stored.clone()).await.unwrap();
        assert_eq!(&sealed.get(k).await.unwrap()[..], b"{\"manifest\": 1}");

        // A wrong key: non-recoverable, says so, shows ids only.
        let wrong = SealedTarget::new(raw.clone(), Some(&key(8)));
        let e = wrong.get(k).await.unwrap_err();
        assert_eq!(e.class(), ErrorClass::NonRecoverable, "{e}");
        assert!(e.to_string().contains("wrong encryption key") && e.to_string().contains(&hex(&key(7).id())), "{e}");
        // No key for an encrypted replica, a key for a plain one.
        let plain = SealedTarget::new(raw.clone(), None);
        let e = plain.get(k).await.unwrap_err();
        assert_eq!(e.class(), ErrorClass::NonRecoverable);
        assert!(e.to_string().contains("is encrypted"), "{e}");
        plain.put("vms/b/1/x", Bytes::from_static(b"{}")).await.unwrap();
        let e = sealed.get("vms/b/1/x").await.unwrap_err();
        assert_eq!(e.class(), ErrorClass::NonRecoverable);
        assert!(e.to_string().contains("written without encryption"), "{e}");
        // Cut short.
        raw.put(k, stored.slice(..HEADER_LEN + 3)).await.unwrap();
        assert!(sealed.get(k).await.unwrap_err().to_string().contains("cut short"));
    }

    #[test]
    fn keys_load_from_raw_or_hex_files_and_print_only_their_id() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        std::fs::write(&raw, [9u8; 32]).unwrap();
        assert_eq!(EncryptionKey::from_file(&raw).unwrap(), key(9));
        let hexed = dir.path().join("hex");
        std::fs::write(&hexed, format!("{}\n", "09".repeat(32))).unwrap();
        assert_eq!(EncryptionKey::from_file(&hexed).unwrap(), key(9));
        let short = dir.path().join("short");
        std::fs::write(&short, [1u8; 16]).unwrap();
        let e = EncryptionKey::from_file(&short).unwrap_err();
        assert!(e.to_string().contains("16 bytes"), "{e}");
        assert!(EncryptionKey::from_file(&dir.path().join("none")).is_err());
        assert!(!format!("{:?}", key(9)).contains("0909"), "{:?}", key(9));
        assert!(EncryptionKey::from_hex("zz".repeat(32).as_str()).is_err());
        assert!(EncryptionKey::from_hex(&format!("+9{}", "09".repeat(31))).is_err());
        let half = dir.path().join("half");
        std::fs::write(&half, "0123456789abcdef0123456789abcdef").unwrap();
        assert!(EncryptionKey::from_file(&half).unwrap_err().to_string().contains("only 16 bytes"));
    }
}
