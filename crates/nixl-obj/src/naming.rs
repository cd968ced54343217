//! Object names.

use sha2::{Digest, Sha256};

/// The stable 64-bit id of a key (the first 8 bytes of SHA-256 of its canonical form,
/// big-endian); NIXL names the object by its decimal form.
pub fn object_id(canonical_key: &[u8]) -> u64 {
    let digest = Sha256::digest(canonical_key);
    u64::from_be_bytes(digest[..8].try_into().unwrap_or_default())
}

/// The DOCA_MEMOS name of a key: 32 lowercase hex characters, the first 128 bits of SHA-256 of
/// its canonical form (the reference's `sha256(key)[:32]`).
pub fn doca_memos_name(canonical_key: &[u8]) -> String {
    Sha256::digest(canonical_key)[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The DOCA_MEMOS name of static slot `slot`: the slot index in 8 hex characters, then 24 hex
/// characters of per-process randomness (the reference's `{i:08x}{uuid[:24]}`).
pub fn static_doca_memos_name(slot: u32, random: &[u8; 12]) -> String {
    let tail: String = random.iter().map(|b| format!("{b:02x}")).collect();
    format!("{slot:08x}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_ids_are_stable_and_distinct() {
        assert_eq!(
            object_id(b"model@1@0@abc@bfloat16"),
            object_id(b"model@1@0@abc@bfloat16")
        );
        assert_ne!(object_id(b"a"), object_id(b"b"));
        // SHA-256("abc") starts ba7816bf8f01cfea.
        assert_eq!(object_id(b"abc"), 0xba78_16bf_8f01_cfea);
    }

    #[test]
    fn doca_names_are_32_lowercase_hex() {
        let name = doca_memos_name(b"abc");
        assert_eq!(name, "ba7816bf8f01cfea414140de5dae2223");
        assert_eq!(name.len(), 32);
        let slot = static_doca_memos_name(0x1f, &[0xab; 12]);
        assert_eq!(slot, format!("0000001f{}", "ab".repeat(12)));
        assert!(
            slot.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
    }
}
