//! Secure aggregation of the mediators' results: the server learns the
//! weighted sum of the maskers' vectors and nothing about any one of them.
//!
//! This is the protocol of Bonawitz et al., "Practical Secure Aggregation
//! for Privacy-Preserving Machine Learning" (CCS 2017), on the complete
//! graph (every masker shares masks with every other; SecAgg+, Bell et al.
//! 2020, thins the graph to `O(log n)` neighbours, which pays off only for
//! thousands of maskers: a round here has at most [`MAX_MASKERS`]
//! mediators). Its security is against an honest-but-curious server and
//! up to `threshold - 1` colluding maskers; a server that lies about who
//! dropped out is answered by each masker revealing, per round, either a
//! masker's self-mask share or its mask-key share, never both
//! ([`Masker::reveal`]). The maskers are the last clients of each chain.
//!
//! A round, with `n` maskers holding slots `1..=n` and a threshold `t`:
//! 1. **Advertise keys.** Each masker draws two X25519 key pairs (one to
//!    encrypt shares, one for masks) and a 32-byte self-mask seed, and
//!    sends the two public keys ([`Masker::keys`]).
//! 2. **Share keys.** Given the roster of advertised keys, each masker
//!    splits its mask secret key and its self-mask seed with Shamir's
//!    scheme over GF(256) (`t` of `n`, the `blahaj` crate) and sends share
//!    `v` to masker `v` encrypted with ChaCha20-Poly1305 under a key agreed
//!    with `v` ([`Masker::share_keys`]); the server only forwards them.
//! 3. **Masked input.** Each masker encodes its vector times its weight in
//!    fixed point ([`SCALE_BITS`] fractional bits, wrapping `u32`), adds
//!    the keystream of its self-mask seed, and for every other masker `v`
//!    that shared keys adds (`u < v`) or subtracts (`u > v`) the keystream
//!    of the seed agreed with `v` ([`Masker::mask`]). Pairwise masks cancel
//!    in the sum.
//! 4. **Unmask.** The server names who sent a masked input (survivors) and
//!    who shared keys but did not (dropped); each survivor reveals its
//!    shares of the survivors' self-mask seeds and of the dropped maskers'
//!    mask keys; with `t` shares of each the server removes the self masks
//!    and the dropped maskers' pairwise masks ([`Unmasker::finish`]).
//!
//! Keystreams are ChaCha20 (RFC 8439) with a 32-byte key and an all-zero
//! nonce, read as little-endian `u32`; agreed keys are
//! HKDF-SHA256(X25519 shared secret, info) with the infos of
//! [`mask_info`] and [`share_info`]. `docs/PROTOCOL.md` states the exact
//! byte layouts, so that a client in another language can mask.

use std::collections::{BTreeMap, BTreeSet};

use blahaj::{Share, Sharks};
use chacha20::ChaCha20;
use chacha20::ChaCha20Rng;
use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20::rand_core::SeedableRng;
use chacha20poly1305::ChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

/// Fractional bits of the fixed-point encoding: a value `x` travels as
/// `round(x * 2^20)` in two's complement modulo `2^32`, a step of about
/// `9.5e-7`.
pub const SCALE_BITS: u32 = 20;

/// Largest magnitude a weighted value may have; larger ones are clamped.
/// With weights summing to at most one, the sum stays within
/// `2^(31 - SCALE_BITS)` = 2,048 and decodes without wrapping.
pub const MAX_VALUE: f64 = 1024.0;

/// Most maskers in one aggregation: Shamir's shares over GF(256) take the
/// maskers' slots `1..=255` as their x coordinates.
pub const MAX_MASKERS: u32 = 255;

/// Bytes of one Shamir share of a 32-byte secret: x, then 32 bytes of y.
pub const SHARE_BYTES: usize = 33;

/// Bytes of the plaintext of an [`EncryptedShare`]: from, to (`u32` little
/// endian), the share of the mask key, the share of the self-mask seed.
pub const SHARE_PLAINTEXT_BYTES: usize = 8 + 2 * SHARE_BYTES;

/// Bytes of an [`EncryptedShare`]'s ciphertext (plaintext plus the 16-byte
/// Poly1305 tag).
pub const SHARE_CIPHERTEXT_BYTES: usize = SHARE_PLAINTEXT_BYTES + 16;

/// Why a step of secure aggregation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SecAggError {
    /// The parameters cannot work: `threshold` must be at least 2 (at least
    /// 1 for a single masker) and at most `maskers`, and `maskers` at most
    /// [`MAX_MASKERS`].
    #[error("secure aggregation of {maskers} maskers with threshold {threshold} is not possible")]
    Parameters {
        /// Maskers.
        maskers: u32,
        /// Threshold.
        threshold: u32,
    },
    /// A slot outside `1..=maskers`, or named twice.
    #[error("slot {0} is not a masker of this round, or is named twice")]
    Slot(u32),
    /// Fewer maskers left than the threshold: the sum cannot be unmasked.
    #[error("{got} maskers left, the threshold is {threshold}")]
    TooFew {
        /// Maskers left.
        got: usize,
        /// Threshold.
        threshold: u32,
    },
    /// A share did not decrypt, or is not what it says it is.
    #[error("share from slot {from}: {reason}")]
    BadShare {
        /// Sender.
        from: u32,
        /// What is wrong.
        reason: String,
    },
    /// A masked vector of the wrong length.
    #[error("masked vector of slot {slot} has {got} values, expected {expected}")]
    Length {
        /// Sender.
        slot: u32,
        /// Values received.
        got: usize,
        /// Values expected.
        expected: usize,
    },
    /// A step came out of order (keys shared twice, masking before the
    /// shares arrived, revealing twice).
    #[error("out of order: {0}")]
    Order(String),
    /// A weight or value that is not finite, or a weight outside `[0, 1]`.
    #[error("value not finite or weight outside [0, 1]: {0}")]
    Value(f64),
    /// The shares of a secret did not reconstruct it.
    #[error("could not reconstruct the secret of slot {0}")]
    Reconstruct(u32),
    /// Enough maskers revealed, but too few of them revealed a share of
    /// this slot's secret: its shares did not decrypt for the others (an
    /// honest masker reveals every share it could decrypt), or that many
    /// revealers withheld them.
    #[error("slot {slot}: {got} of its shares revealed by {revealers} maskers, {threshold} needed")]
    Unrecoverable {
        /// The slot whose secret could not be rebuilt.
        slot: u32,
        /// Its shares revealed.
        got: usize,
        /// Maskers that revealed.
        revealers: usize,
        /// Shares needed.
        threshold: u32,
    },
}

impl SecAggError {
    /// The masker an unmasking failure points at: the slot whose secret
    /// could not be rebuilt while enough maskers revealed
    /// ([`SecAggError::Unrecoverable`]), or whose revealed shares rebuild
    /// nothing it advertised ([`SecAggError::Reconstruct`]). Framing an
    /// honest masker takes more than `revealers - threshold` hostile
    /// revealers withholding or corrupting its shares
    /// (docs/PRIVACY.md). `None` for failures no one masker caused.
    pub fn suspect(&self) -> Option<u32> {
        match *self {
            Self::Unrecoverable { slot, .. } | Self::Reconstruct(slot) => Some(slot),
            _ => None,
        }
    }
}

/// The parameters of one aggregation, the same at every masker and at the
/// server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecAggParams {
    /// The round, bound into every agreed key so keys never repeat.
    pub round: u32,
    /// Maskers, holding slots `1..=maskers`.
    pub maskers: u32,
    /// Shares needed to reconstruct a secret; also the fewest maskers that
    /// must survive. `maskers - threshold` may drop out.
    pub threshold: u32,
}

impl SecAggParams {
    /// Parameters with the default threshold, a majority: `floor(n/2) + 1`
    /// (Bonawitz et al. 2017 §4), so that up to `ceil(n/2) - 1` maskers may
    /// drop and fewer than half can collude.
    ///
    /// # Errors
    /// [`SecAggError::Parameters`] for no maskers or more than [`MAX_MASKERS`].
    pub fn majority(round: u32, maskers: u32) -> Result<Self, SecAggError> {
        Self::new(round, maskers, maskers / 2 + 1)
    }

    /// Parameters whose threshold is at least `fraction` of the maskers
    /// (rounded up), and never below the majority of
    /// [`SecAggParams::majority`]: a higher threshold tolerates fewer
    /// dropouts, takes more colluding maskers to break, and under
    /// distributed DP needs less noise from each masker
    /// (`crate::privacy::distributed_noise_share`).
    ///
    /// # Errors
    /// [`SecAggError::Parameters`] as [`SecAggParams::majority`], or for
    /// a `fraction` outside `(0, 1]`.
    pub fn quorum(round: u32, maskers: u32, fraction: f64) -> Result<Self, SecAggError> {
        if !Self::is_quorum(fraction) {
            return Err(SecAggError::Parameters {
                maskers,
                threshold: 0,
            });
        }
        // Less a hair, so that 0.9 of 200 (180.00000000000003 in f64) is 180.
        let wanted = (fraction * f64::from(maskers) - 1e-9).ceil() as u32;
        Self::new(
            round,
            maskers,
            wanted.clamp(maskers / 2 + 1, maskers.max(1)),
        )
    }

    /// Whether `fraction` can be a quorum's share of the maskers: in
    /// `(0, 1]`.
    pub fn is_quorum(fraction: f64) -> bool {
        fraction > 0.0 && fraction <= 1.0
    }

    /// Parameters with an explicit threshold.
    ///
    /// # Errors
    /// [`SecAggError::Parameters`] unless `1 <= threshold <= maskers <=
    /// MAX_MASKERS` and `threshold >= 2` when there are two maskers or more
    /// (Shamir's scheme needs two shares to hide anything).
    pub fn new(round: u32, maskers: u32, threshold: u32) -> Result<Self, SecAggError> {
        let ok = (1..=MAX_MASKERS).contains(&maskers)
            && (1..=maskers).contains(&threshold)
            && (maskers == 1 || threshold >= 2);
        if !ok {
            return Err(SecAggError::Parameters { maskers, threshold });
        }
        Ok(Self {
            round,
            maskers,
            threshold,
        })
    }

    /// The fewest survivors with which the sum may be unmasked: the
    /// threshold, and at least three once there are three maskers (the sum
    /// of two, one of them colluding with the server, is the other's
    /// result).
    pub fn min_survivors(&self) -> usize {
        (self.threshold as usize).max(3.min(self.maskers as usize))
    }

    fn check_slot(&self, slot: u32) -> Result<(), SecAggError> {
        if slot == 0 || slot > self.maskers {
            return Err(SecAggError::Slot(slot));
        }
        Ok(())
    }
}

/// A masker's public keys (step 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertisedKeys {
    /// The masker's slot.
    pub slot: u32,
    /// X25519 public key for the shares' encryption.
    #[serde(with = "hex32")]
    pub cipher_key: [u8; 32],
    /// X25519 public key for the pairwise masks.
    #[serde(with = "hex32")]
    pub mask_key: [u8; 32],
    /// SHA-256 of the masker's self-mask seed: the server checks the seed
    /// it rebuilds from the survivors' shares against it, so a wrong share
    /// is caught instead of leaving noise in the sum.
    #[serde(with = "hex32")]
    pub seed_commitment: [u8; 32],
}

/// A share from one masker to another, encrypted so the server that
/// forwards it cannot read it (step 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedShare {
    /// Sender's slot.
    pub from: u32,
    /// Recipient's slot.
    pub to: u32,
    /// ChaCha20-Poly1305 ciphertext of [`SHARE_PLAINTEXT_BYTES`] bytes plus
    /// the tag, as lowercase hex.
    #[serde(with = "hexvec")]
    pub ciphertext: Vec<u8>,
}

/// Which secret a revealed share belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecretKind {
    /// A surviving masker's self-mask seed.
    SelfMask,
    /// A dropped masker's mask secret key.
    MaskKey,
}

/// A share a survivor reveals to the server (step 4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevealedShare {
    /// Whose secret.
    pub of: u32,
    /// Which secret.
    pub kind: SecretKind,
    /// The Shamir share ([`SHARE_BYTES`] bytes), as lowercase hex.
    #[serde(with = "hexvec")]
    pub share: Vec<u8>,
}

/// The HKDF info of the pairwise mask seed of slots `a < b` in `round`:
/// `"astraea-secagg-v1 mask"`, then round, a, b as `u32` little endian.
pub fn mask_info(round: u32, a: u32, b: u32) -> Vec<u8> {
    let mut info = b"astraea-secagg-v1 mask".to_vec();
    for n in [round, a.min(b), a.max(b)] {
        info.extend_from_slice(&n.to_le_bytes());
    }
    info
}

/// The HKDF info of the share encryption key between slots `a` and `b` in
/// `round`: `"astraea-secagg-v1 share"`, then round, min, max as `u32`
/// little endian. The nonce of a share is from, to (`u32` little endian),
/// then four zero bytes, so the two directions never share a nonce.
pub fn share_info(round: u32, a: u32, b: u32) -> Vec<u8> {
    let mut info = b"astraea-secagg-v1 share".to_vec();
    for n in [round, a.min(b), a.max(b)] {
        info.extend_from_slice(&n.to_le_bytes());
    }
    info
}

/// Whether `public` is a usable X25519 key: not one of the low-order
/// points, whose shared secret with any key is all zeros (RFC 7748 §6.1).
pub fn is_contributory(public: &[u8; 32]) -> bool {
    StaticSecret::from([1u8; 32])
        .diffie_hellman(&PublicKey::from(*public))
        .was_contributory()
}

fn agreed_key(secret: &StaticSecret, public: &[u8; 32], info: &[u8]) -> [u8; 32] {
    let shared = secret.diffie_hellman(&PublicKey::from(*public));
    let mut key = [0u8; 32];
    Hkdf::<Sha256>::new(None, shared.as_bytes())
        .expand(info, &mut key)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    key
}

/// SHA-256 of a self-mask seed ([`AdvertisedKeys::seed_commitment`]).
pub fn commitment(seed: &[u8; 32]) -> [u8; 32] {
    use sha2::Digest;
    Sha256::digest(seed).into()
}

fn share_nonce(from: u32, to: u32) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(&from.to_le_bytes());
    nonce[4..8].copy_from_slice(&to.to_le_bytes());
    nonce
}

/// Adds (`sign = true`) or subtracts the ChaCha20 keystream of `seed`,
/// read as little-endian `u32`, to `values`, wrapping.
fn apply_keystream(values: &mut [u32], seed: &[u8; 32], add: bool) {
    let mut cipher = ChaCha20::new(seed.into(), &[0u8; 12].into());
    let mut block = [0u8; 4096];
    for chunk in values.chunks_mut(block.len() / 4) {
        let bytes = &mut block[..chunk.len() * 4];
        bytes.fill(0);
        cipher.apply_keystream(bytes);
        for (value, word) in chunk.iter_mut().zip(bytes.chunks_exact(4)) {
            let mask = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            *value = if add {
                value.wrapping_add(mask)
            } else {
                value.wrapping_sub(mask)
            };
        }
    }
}

/// `x` in fixed point ([`SCALE_BITS`]), clamped to [`MAX_VALUE`].
pub fn encode_value(x: f64) -> u32 {
    let clamped = x.clamp(-MAX_VALUE, MAX_VALUE);
    ((clamped * f64::from(1u32 << SCALE_BITS)).round() as i64) as i32 as u32
}

/// The value of a fixed-point sum ([`SCALE_BITS`]).
pub fn decode_value(v: u32) -> f64 {
    f64::from(v as i32) / f64::from(1u32 << SCALE_BITS)
}

/// One masker's side of a round. Its secrets never leave it except as
/// Shamir shares.
pub struct Masker {
    params: SecAggParams,
    slot: u32,
    cipher_secret: StaticSecret,
    mask_secret: StaticSecret,
    self_seed: [u8; 32],
    rng: ChaCha20Rng,
    roster: BTreeMap<u32, AdvertisedKeys>,
    shared: bool,
    /// Shares received: from slot -> (mask-key share, self-seed share);
    /// its own share of its own secrets included.
    received: BTreeMap<u32, (Vec<u8>, Vec<u8>)>,
    /// The maskers that shared keys with this one (its inbox's senders
    /// and itself), once the inbox came: those its result is masked
    /// against, even when a sender's share did not check out.
    sharers: Option<BTreeSet<u32>>,
    revealed: bool,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Masker")
            .field("params", &self.params)
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl Masker {
    /// A masker in `slot` whose secrets come from `entropy` (32 bytes from
    /// the operating system's or the browser's generator; tests pass fixed
    /// bytes).
    ///
    /// # Errors
    /// [`SecAggError::Slot`] for a slot outside `1..=params.maskers`.
    pub fn new(params: SecAggParams, slot: u32, entropy: [u8; 32]) -> Result<Self, SecAggError> {
        params.check_slot(slot)?;
        let mut rng = ChaCha20Rng::from_seed(entropy);
        let mut draw = || {
            let mut bytes = [0u8; 32];
            chacha20::rand_core::Rng::fill_bytes(&mut rng, &mut bytes);
            bytes
        };
        let cipher_secret = StaticSecret::from(draw());
        let mask_secret = StaticSecret::from(draw());
        let self_seed = draw();
        Ok(Self {
            params,
            slot,
            cipher_secret,
            mask_secret,
            self_seed,
            rng,
            roster: BTreeMap::new(),
            shared: false,
            received: BTreeMap::new(),
            sharers: None,
            revealed: false,
        })
    }

    /// A masker seeded from the system's entropy.
    ///
    /// # Errors
    /// [`SecAggError::Slot`] as [`Masker::new`]; [`SecAggError::Order`]
    /// when the system has no entropy to give.
    pub fn from_entropy(params: SecAggParams, slot: u32) -> Result<Self, SecAggError> {
        let mut entropy = [0u8; 32];
        getrandom::fill(&mut entropy)
            .map_err(|e| SecAggError::Order(format!("no entropy: {e}")))?;
        Self::new(params, slot, entropy)
    }

    /// The masker's slot.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The round's parameters, as the server set them up.
    pub fn params(&self) -> SecAggParams {
        self.params
    }

    /// Step 1: the public keys to advertise.
    pub fn keys(&self) -> AdvertisedKeys {
        AdvertisedKeys {
            slot: self.slot,
            cipher_key: PublicKey::from(&self.cipher_secret).to_bytes(),
            mask_key: PublicKey::from(&self.mask_secret).to_bytes(),
            seed_commitment: commitment(&self.self_seed),
        }
    }

    /// Step 2: given the roster of every masker's advertised keys (its own
    /// among them, at least `threshold` of them), one encrypted share for
    /// each other masker in the roster.
    ///
    /// # Errors
    /// [`SecAggError::Slot`] for a slot outside the round or named twice,
    /// or a roster that lacks this masker or misstates its keys;
    /// [`SecAggError::TooFew`] below the threshold; [`SecAggError::Order`]
    /// when called twice.
    pub fn share_keys(
        &mut self,
        roster: &[AdvertisedKeys],
    ) -> Result<Vec<EncryptedShare>, SecAggError> {
        if self.shared {
            return Err(SecAggError::Order("keys already shared".into()));
        }
        let roster = check_roster(&self.params, roster)?;
        if roster.get(&self.slot) != Some(&self.keys()) {
            return Err(SecAggError::Slot(self.slot));
        }
        let sharks = Sharks(self.params.threshold as u8);
        let mask_shares: Vec<Vec<u8>> = sharks
            .dealer_rng(self.mask_secret.as_bytes(), &mut self.rng)
            .take(self.params.maskers as usize)
            .map(|s| Vec::from(&s))
            .collect();
        let seed_shares: Vec<Vec<u8>> = sharks
            .dealer_rng(&self.self_seed, &mut self.rng)
            .take(self.params.maskers as usize)
            .map(|s| Vec::from(&s))
            .collect();
        let mut out = Vec::with_capacity(roster.len());
        for (&to, keys) in &roster {
            let index = (to - 1) as usize;
            debug_assert_eq!(mask_shares[index][0] as u32, to);
            if to == self.slot {
                self.received
                    .insert(to, (mask_shares[index].clone(), seed_shares[index].clone()));
                continue;
            }
            let mut plaintext = Vec::with_capacity(SHARE_PLAINTEXT_BYTES);
            plaintext.extend_from_slice(&self.slot.to_le_bytes());
            plaintext.extend_from_slice(&to.to_le_bytes());
            plaintext.extend_from_slice(&mask_shares[index]);
            plaintext.extend_from_slice(&seed_shares[index]);
            let key = agreed_key(
                &self.cipher_secret,
                &keys.cipher_key,
                &share_info(self.params.round, self.slot, to),
            );
            let ciphertext = ChaCha20Poly1305::new(&key.into())
                .encrypt(
                    &share_nonce(self.slot, to).into(),
                    Payload {
                        msg: &plaintext,
                        aad: &[],
                    },
                )
                .expect("encrypting a short message does not fail");
            out.push(EncryptedShare {
                from: self.slot,
                to,
                ciphertext,
            });
        }
        self.roster = roster;
        self.shared = true;
        Ok(out)
    }

    /// Step 2, receiving: the shares addressed to this masker, one from
    /// every other masker that shared keys. The senders (and this masker)
    /// are the maskers whose pairwise masks [`Masker::mask`] adds. A share
    /// that does not decrypt or check out is not kept, but its sender still
    /// counts as a sharer (the pairwise mask comes from the roster's keys,
    /// not from the share): one hostile masker cannot push honest ones out
    /// of the round. Returns the senders whose shares were not kept.
    ///
    /// # Errors
    /// [`SecAggError::TooFew`] when fewer than `threshold` maskers (this one
    /// included) shared; [`SecAggError::Order`] before
    /// [`Masker::share_keys`], or twice.
    pub fn receive_shares(&mut self, shares: &[EncryptedShare]) -> Result<Vec<u32>, SecAggError> {
        if !self.shared || self.sharers.is_some() {
            return Err(SecAggError::Order(
                "shares received before sharing keys, or twice".into(),
            ));
        }
        let mut sharers = BTreeSet::from([self.slot]);
        let mut received = BTreeMap::new();
        let mut refused = Vec::new();
        for share in shares {
            // A sender outside the roster, or heard twice, has no pairwise
            // key here (or a second one): ignored.
            if share.from == self.slot
                || share.to != self.slot
                || !self.roster.contains_key(&share.from)
                || !sharers.insert(share.from)
            {
                continue;
            }
            match self.open_share(share) {
                Some(pair) => {
                    received.insert(share.from, pair);
                }
                None => refused.push(share.from),
            }
        }
        if sharers.len() < self.params.threshold as usize {
            return Err(SecAggError::TooFew {
                got: sharers.len(),
                threshold: self.params.threshold,
            });
        }
        self.received.extend(received);
        self.sharers = Some(sharers);
        Ok(refused)
    }

    /// The (mask-key share, self-seed share) inside `share`, if it
    /// decrypts and is what it says it is.
    fn open_share(&self, share: &EncryptedShare) -> Option<(Vec<u8>, Vec<u8>)> {
        let keys = self.roster.get(&share.from)?;
        let key = agreed_key(
            &self.cipher_secret,
            &keys.cipher_key,
            &share_info(self.params.round, share.from, self.slot),
        );
        let plaintext = ChaCha20Poly1305::new(&key.into())
            .decrypt(
                &share_nonce(share.from, self.slot).into(),
                Payload {
                    msg: &share.ciphertext,
                    aad: &[],
                },
            )
            .ok()?;
        let ok = plaintext.len() == SHARE_PLAINTEXT_BYTES
            && plaintext[..4] == share.from.to_le_bytes()
            && plaintext[4..8] == self.slot.to_le_bytes()
            && plaintext[8] as u32 == self.slot
            && plaintext[8 + SHARE_BYTES] as u32 == self.slot;
        ok.then(|| {
            (
                plaintext[8..8 + SHARE_BYTES].to_vec(),
                plaintext[8 + SHARE_BYTES..].to_vec(),
            )
        })
    }

    /// The maskers that shared keys with this one (itself included), in
    /// order: those its masked input is masked against. Empty before the
    /// inbox came.
    pub fn sharers(&self) -> Vec<u32> {
        self.sharers
            .as_ref()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Step 3: `values` times `weight`, in fixed point, masked.
    ///
    /// # Shapes
    /// One `u32` out per value in.
    ///
    /// # Errors
    /// [`SecAggError::Value`] for a weight outside `[0, 1]` or a
    /// non-finite value; [`SecAggError::Order`] before the shares arrived.
    pub fn mask(&self, values: &[f32], weight: f64) -> Result<Vec<u32>, SecAggError> {
        let Some(sharers) = &self.sharers else {
            return Err(SecAggError::Order(
                "masking before the shares arrived".into(),
            ));
        };
        if !(0.0..=1.0).contains(&weight) {
            return Err(SecAggError::Value(weight));
        }
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            return Err(SecAggError::Value(f64::from(*bad)));
        }
        let mut out: Vec<u32> = values
            .iter()
            .map(|&v| encode_value(f64::from(v) * weight))
            .collect();
        apply_keystream(&mut out, &self.self_seed, true);
        for &other in sharers.iter().filter(|&&s| s != self.slot) {
            let keys = &self.roster[&other];
            let seed = agreed_key(
                &self.mask_secret,
                &keys.mask_key,
                &mask_info(self.params.round, self.slot, other),
            );
            apply_keystream(&mut out, &seed, self.slot < other);
        }
        Ok(out)
    }

    /// Step 4: the shares the server asks for: of each survivor's self-mask
    /// seed and each dropped masker's mask key (those this masker holds:
    /// a share that did not check out is left out). Answers once a round.
    ///
    /// # Errors
    /// [`SecAggError::Slot`] when a slot is both survivor and dropped, this
    /// masker is not a survivor, or the two lists together are not exactly
    /// the maskers that shared; [`SecAggError::TooFew`] for fewer survivors
    /// than [`SecAggParams::min_survivors`] (the server would gain nothing
    /// but a chance to learn a result); [`SecAggError::Order`] before the
    /// inbox, or when asked twice.
    pub fn reveal(
        &mut self,
        survivors: &[u32],
        dropped: &[u32],
    ) -> Result<Vec<RevealedShare>, SecAggError> {
        if self.revealed {
            return Err(SecAggError::Order("already revealed this round".into()));
        }
        let Some(sharers) = &self.sharers else {
            return Err(SecAggError::Order(
                "asked to reveal before the inbox".into(),
            ));
        };
        let survivors_set: BTreeSet<u32> = survivors.iter().copied().collect();
        let dropped_set: BTreeSet<u32> = dropped.iter().copied().collect();
        if survivors_set.len() != survivors.len() || dropped_set.len() != dropped.len() {
            return Err(SecAggError::Slot(0));
        }
        if let Some(&both) = survivors_set.intersection(&dropped_set).next() {
            return Err(SecAggError::Slot(both));
        }
        if !survivors_set.contains(&self.slot) {
            return Err(SecAggError::Slot(self.slot));
        }
        // The survivors and the dropped together must be exactly the
        // maskers that shared: anyone else has no shares here, and a
        // server that leaves someone out could be hiding a double claim.
        let named: BTreeSet<u32> = survivors_set.union(&dropped_set).copied().collect();
        if named != *sharers {
            let odd = named
                .symmetric_difference(sharers)
                .next()
                .copied()
                .unwrap_or(0);
            return Err(SecAggError::Slot(odd));
        }
        let needed = self.params.min_survivors();
        if survivors_set.len() < needed {
            return Err(SecAggError::TooFew {
                got: survivors_set.len(),
                threshold: needed as u32,
            });
        }
        self.revealed = true;
        let mut out = Vec::with_capacity(named.len());
        for slot in &survivors_set {
            if let Some((_, seed_share)) = self.received.get(slot) {
                out.push(RevealedShare {
                    of: *slot,
                    kind: SecretKind::SelfMask,
                    share: seed_share.clone(),
                });
            }
        }
        for slot in &dropped_set {
            if let Some((mask_share, _)) = self.received.get(slot) {
                out.push(RevealedShare {
                    of: *slot,
                    kind: SecretKind::MaskKey,
                    share: mask_share.clone(),
                });
            }
        }
        Ok(out)
    }
}

fn check_roster(
    params: &SecAggParams,
    roster: &[AdvertisedKeys],
) -> Result<BTreeMap<u32, AdvertisedKeys>, SecAggError> {
    let mut map = BTreeMap::new();
    for keys in roster {
        params.check_slot(keys.slot)?;
        if !is_contributory(&keys.cipher_key) || !is_contributory(&keys.mask_key) {
            return Err(SecAggError::Slot(keys.slot));
        }
        if map.insert(keys.slot, *keys).is_some() {
            return Err(SecAggError::Slot(keys.slot));
        }
    }
    if map.len() < params.threshold as usize {
        return Err(SecAggError::TooFew {
            got: map.len(),
            threshold: params.threshold,
        });
    }
    Ok(map)
}

/// The server's side of a round: it forwards shares it cannot read, sums
/// the masked vectors and, from the survivors' revealed shares, removes the
/// masks.
#[derive(Debug, Clone)]
pub struct Unmasker {
    params: SecAggParams,
    len: usize,
    roster: BTreeMap<u32, AdvertisedKeys>,
    sharers: BTreeSet<u32>,
    sum: Vec<u32>,
    weights: BTreeMap<u32, f64>,
}

impl Unmasker {
    /// An aggregation of vectors of `len` values.
    pub fn new(params: SecAggParams, len: usize) -> Self {
        Self {
            params,
            len,
            roster: BTreeMap::new(),
            sharers: BTreeSet::new(),
            sum: vec![0; len],
            weights: BTreeMap::new(),
        }
    }

    /// The parameters.
    pub fn params(&self) -> SecAggParams {
        self.params
    }

    /// Step 1 closes: the keys advertised; the roster to send every
    /// masker that advertised.
    ///
    /// # Errors
    /// As [`Masker::share_keys`]'s roster checks.
    pub fn roster(&mut self, keys: &[AdvertisedKeys]) -> Result<Vec<AdvertisedKeys>, SecAggError> {
        // A low-order key would make the agreed keys public: its masker
        // stays out of the round.
        let usable: Vec<AdvertisedKeys> = keys
            .iter()
            .filter(|k| is_contributory(&k.cipher_key) && is_contributory(&k.mask_key))
            .copied()
            .collect();
        self.roster = check_roster(&self.params, &usable)?;
        Ok(self.roster.values().copied().collect())
    }

    /// Step 2 closes: the shares each sender sent, checked for shape, and
    /// grouped by recipient. Senders not in the roster, or whose shares do
    /// not cover every other roster member exactly once, are left out (they
    /// count as dropped before masking).
    ///
    /// # Errors
    /// [`SecAggError::TooFew`] when fewer than `threshold` maskers shared.
    pub fn route(
        &mut self,
        sent: BTreeMap<u32, Vec<EncryptedShare>>,
    ) -> Result<BTreeMap<u32, Vec<EncryptedShare>>, SecAggError> {
        let mut sharers = BTreeSet::new();
        let mut kept = Vec::new();
        for (from, shares) in sent {
            if !self.roster.contains_key(&from) {
                continue;
            }
            let recipients: BTreeSet<u32> = shares.iter().map(|s| s.to).collect();
            let expected: BTreeSet<u32> =
                self.roster.keys().copied().filter(|&s| s != from).collect();
            let well_formed = shares.len() == expected.len()
                && recipients == expected
                && shares
                    .iter()
                    .all(|s| s.from == from && s.ciphertext.len() == SHARE_CIPHERTEXT_BYTES);
            if well_formed {
                sharers.insert(from);
                kept.extend(shares);
            }
        }
        if sharers.len() < self.params.threshold as usize {
            return Err(SecAggError::TooFew {
                got: sharers.len(),
                threshold: self.params.threshold,
            });
        }
        let mut out: BTreeMap<u32, Vec<EncryptedShare>> =
            sharers.iter().map(|&s| (s, Vec::new())).collect();
        for share in kept {
            if sharers.contains(&share.from)
                && let Some(inbox) = out.get_mut(&share.to)
            {
                inbox.push(share);
            }
        }
        self.sharers = sharers;
        Ok(out)
    }

    /// The maskers that shared keys (step 2's survivors).
    pub fn sharers(&self) -> Vec<u32> {
        self.sharers.iter().copied().collect()
    }

    /// Step 3: adds a sharer's masked vector, of the given weight.
    ///
    /// # Errors
    /// [`SecAggError::Slot`] for a masker that did not share or sent twice;
    /// [`SecAggError::Length`] for the wrong length; [`SecAggError::Value`]
    /// for a weight outside `[0, 1]`.
    pub fn add_masked(
        &mut self,
        slot: u32,
        masked: &[u32],
        weight: f64,
    ) -> Result<(), SecAggError> {
        if !self.sharers.contains(&slot) || self.weights.contains_key(&slot) {
            return Err(SecAggError::Slot(slot));
        }
        if masked.len() != self.len {
            return Err(SecAggError::Length {
                slot,
                got: masked.len(),
                expected: self.len,
            });
        }
        if !(0.0..=1.0).contains(&weight) {
            return Err(SecAggError::Value(weight));
        }
        for (sum, &v) in self.sum.iter_mut().zip(masked) {
            *sum = sum.wrapping_add(v);
        }
        self.weights.insert(slot, weight);
        Ok(())
    }

    /// Step 4 opens: (survivors, dropped) to send every survivor.
    pub fn unmask_request(&self) -> (Vec<u32>, Vec<u32>) {
        let survivors: Vec<u32> = self.weights.keys().copied().collect();
        let dropped = self
            .sharers
            .iter()
            .copied()
            .filter(|s| !self.weights.contains_key(s))
            .collect();
        (survivors, dropped)
    }

    /// Step 4 closes: from the survivors' revealed shares, the weighted mean
    /// of the survivors' vectors, `sum_u w_u x_u / sum_u w_u`, and that
    /// weight sum. Shares that fail to parse or name a slot not asked about
    /// are ignored; any `threshold` good shares of a secret suffice.
    ///
    /// # Errors
    /// [`SecAggError::TooFew`] for fewer survivors or shares than the
    /// threshold; [`SecAggError::Unrecoverable`] when enough maskers
    /// revealed but too few shares of one slot's secret came (its shares
    /// did not decrypt for the others); [`SecAggError::Reconstruct`] when a
    /// masker's shares do not give back the seed or key it advertised
    /// (both name the slot: [`SecAggError::suspect`]);
    /// [`SecAggError::Value`] when the survivors' weights sum to zero.
    pub fn finish(
        mut self,
        revealed: &BTreeMap<u32, Vec<RevealedShare>>,
    ) -> Result<(Vec<f32>, f64), SecAggError> {
        let (survivors, dropped) = self.unmask_request();
        let threshold = self.params.threshold as usize;
        let needed = self.params.min_survivors();
        if survivors.len() < needed {
            return Err(SecAggError::TooFew {
                got: survivors.len(),
                threshold: needed as u32,
            });
        }
        // One share per (secret, revealer): a share's x is its revealer's
        // slot, so a revealer that repeats itself adds nothing.
        let mut shares: BTreeMap<(u32, SecretKind), BTreeMap<u32, Share>> = BTreeMap::new();
        for (&from, list) in revealed {
            if !self.weights.contains_key(&from) {
                continue;
            }
            for r in list {
                let expected = match r.kind {
                    SecretKind::SelfMask => survivors.contains(&r.of),
                    SecretKind::MaskKey => dropped.contains(&r.of),
                };
                if !expected || r.share.len() != SHARE_BYTES || r.share[0] as u32 != from {
                    continue;
                }
                if let Ok(share) = Share::try_from(r.share.as_slice()) {
                    shares
                        .entry((r.of, r.kind))
                        .or_default()
                        .entry(from)
                        .or_insert(share);
                }
            }
        }
        // Maskers of this round that revealed anything.
        let revealers = revealed
            .iter()
            .filter(|(from, list)| self.weights.contains_key(from) && !list.is_empty())
            .count();
        let sharks = Sharks(self.params.threshold as u8);
        // Rebuilds a secret from `threshold` of its shares and checks it
        // against what its owner advertised (the seed's commitment, the
        // mask key's public key); one wrong share from a hostile revealer
        // is stepped around by leaving out each share in turn.
        let roster = &self.roster;
        let recover = |slot: u32, kind: SecretKind| -> Result<[u8; 32], SecAggError> {
            let list: Vec<Share> = shares
                .get(&(slot, kind))
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            if list.len() < threshold {
                // Too few revealed at all: no one masker is to blame.
                if revealers < threshold {
                    return Err(SecAggError::TooFew {
                        got: revealers,
                        threshold: self.params.threshold,
                    });
                }
                return Err(SecAggError::Unrecoverable {
                    slot,
                    got: list.len(),
                    revealers,
                    threshold: self.params.threshold,
                });
            }
            let advertised = &roster[&slot];
            let left_out = std::iter::once(None).chain((0..list.len()).map(Some));
            for skip in left_out {
                let subset: Vec<Share> = list
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| Some(*i) != skip)
                    .map(|(_, share)| share.clone())
                    .take(threshold)
                    .collect();
                if subset.len() < threshold {
                    continue;
                }
                let Ok(secret) = sharks.recover(&subset) else {
                    continue;
                };
                let Ok(secret) = <[u8; 32]>::try_from(secret) else {
                    continue;
                };
                let checks = match kind {
                    SecretKind::SelfMask => commitment(&secret) == advertised.seed_commitment,
                    SecretKind::MaskKey => {
                        PublicKey::from(&StaticSecret::from(secret)).to_bytes()
                            == advertised.mask_key
                    }
                };
                if checks {
                    return Ok(secret);
                }
            }
            Err(SecAggError::Reconstruct(slot))
        };
        for &slot in &survivors {
            let seed = recover(slot, SecretKind::SelfMask)?;
            apply_keystream(&mut self.sum, &seed, false);
        }
        for &gone in &dropped {
            let secret = StaticSecret::from(recover(gone, SecretKind::MaskKey)?);
            for &u in &survivors {
                let seed = agreed_key(
                    &secret,
                    &self.roster[&u].mask_key,
                    &mask_info(self.params.round, gone, u),
                );
                // Survivor u added the mask if u < gone; take off what it did.
                apply_keystream(&mut self.sum, &seed, u > gone);
            }
        }
        let total: f64 = self.weights.values().sum();
        if total <= 0.0 {
            return Err(SecAggError::Value(total));
        }
        let mean = self
            .sum
            .iter()
            .map(|&v| (decode_value(v) / total) as f32)
            .collect();
        Ok((mean, total))
    }
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = <&str>::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).map_err(D::Error::custom)?;
        Ok(out)
    }
}

mod hexvec {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    /// Longest hex string accepted (a ciphertext is 90 bytes).
    const MAX_HEX: usize = 256;

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <&str>::deserialize(d)?;
        if text.len() > MAX_HEX {
            return Err(D::Error::custom("hex string too long"));
        }
        hex::decode(text).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a whole round over `inputs` (one vector and weight per masker);
    /// maskers in `drop_before_masking` share keys but send no masked input.
    /// Step 1 and the sending half of step 2 for `params.maskers` maskers
    /// (secrets from `[slot + salt; 32]`) and a server summing `len`
    /// values: the maskers, the server and what each masker sent.
    fn shared(
        params: SecAggParams,
        salt: u8,
        len: usize,
    ) -> (Vec<Masker>, Unmasker, BTreeMap<u32, Vec<EncryptedShare>>) {
        let mut maskers: Vec<Masker> = (1..=params.maskers)
            .map(|slot| Masker::new(params, slot, [slot as u8 + salt; 32]).unwrap())
            .collect();
        let mut server = Unmasker::new(params, len);
        let keys: Vec<AdvertisedKeys> = maskers.iter().map(Masker::keys).collect();
        let roster = server.roster(&keys).unwrap();
        let sent = maskers
            .iter_mut()
            .map(|m| (m.slot(), m.share_keys(&roster).unwrap()))
            .collect();
        (maskers, server, sent)
    }

    /// Step 3 and 4 with every masker surviving: its weighted input masked
    /// into the server's sum, then every masker's revealed shares.
    fn mask_and_reveal(
        maskers: &mut [Masker],
        server: &mut Unmasker,
        inputs: &[(Vec<f32>, f64)],
    ) -> BTreeMap<u32, Vec<RevealedShare>> {
        for (m, (values, weight)) in maskers.iter().zip(inputs) {
            server
                .add_masked(m.slot(), &m.mask(values, *weight).unwrap(), *weight)
                .unwrap();
        }
        let (survivors, dropped) = server.unmask_request();
        maskers
            .iter_mut()
            .map(|m| (m.slot(), m.reveal(&survivors, &dropped).unwrap()))
            .collect()
    }

    fn run_round(
        inputs: &[(Vec<f32>, f64)],
        threshold: u32,
        drop_before_masking: &[u32],
    ) -> Result<(Vec<f32>, f64), SecAggError> {
        let n = inputs.len() as u32;
        let params = SecAggParams::new(7, n, threshold)?;
        let (mut maskers, mut server, sent) = shared(params, 0, inputs[0].0.len());
        let inboxes = server.route(sent)?;
        for m in &mut maskers {
            m.receive_shares(&inboxes[&m.slot()])?;
        }
        for (m, (values, weight)) in maskers.iter().zip(inputs) {
            if drop_before_masking.contains(&m.slot()) {
                continue;
            }
            server.add_masked(m.slot(), &m.mask(values, *weight)?, *weight)?;
        }
        let (survivors, dropped) = server.unmask_request();
        let mut revealed = BTreeMap::new();
        for m in &mut maskers {
            if survivors.contains(&m.slot()) {
                revealed.insert(m.slot(), m.reveal(&survivors, &dropped)?);
            }
        }
        server.finish(&revealed)
    }

    fn inputs(n: usize, len: usize) -> Vec<(Vec<f32>, f64)> {
        (0..n)
            .map(|i| {
                let values = (0..len)
                    .map(|j| ((i * 31 + j * 7) % 19) as f32 / 10.0 - 0.9)
                    .collect();
                (values, 1.0 / n as f64)
            })
            .collect()
    }

    fn weighted_mean(inputs: &[(Vec<f32>, f64)], skip: &[u32]) -> Vec<f32> {
        let kept: Vec<_> = inputs
            .iter()
            .enumerate()
            .filter(|(i, _)| !skip.contains(&(*i as u32 + 1)))
            .map(|(_, x)| x)
            .collect();
        let total: f64 = kept.iter().map(|(_, w)| w).sum();
        (0..inputs[0].0.len())
            .map(|j| (kept.iter().map(|(v, w)| f64::from(v[j]) * w).sum::<f64>() / total) as f32)
            .collect()
    }

    fn assert_close(a: &[f32], b: &[f32]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    #[test]
    fn the_server_gets_the_weighted_mean_and_masks_cancel() {
        let inputs = inputs(5, 300);
        let (mean, total) = run_round(&inputs, 3, &[]).unwrap();
        assert!((total - 1.0).abs() < 1e-12);
        assert_close(&mean, &weighted_mean(&inputs, &[]));
    }

    #[test]
    fn unequal_weights_give_the_sample_weighted_mean() {
        let mut inputs = inputs(4, 50);
        for (i, (_, w)) in inputs.iter_mut().enumerate() {
            *w = [0.1, 0.2, 0.3, 0.4][i];
        }
        let (mean, _) = run_round(&inputs, 3, &[]).unwrap();
        assert_close(&mean, &weighted_mean(&inputs, &[]));
    }

    #[test]
    fn maskers_that_drop_after_sharing_are_unmasked_from_the_others_shares() {
        let inputs = inputs(10, 200);
        let (mean, total) = run_round(&inputs, 6, &[3, 8]).unwrap();
        assert!((total - 0.8).abs() < 1e-12);
        assert_close(&mean, &weighted_mean(&inputs, &[3, 8]));
    }

    #[test]
    fn too_many_dropouts_fail_rather_than_reveal() {
        let inputs = inputs(5, 10);
        let err = run_round(&inputs, 3, &[1, 2, 3]).unwrap_err();
        assert!(matches!(err, SecAggError::TooFew { .. }), "{err}");
    }

    #[test]
    fn a_masked_vector_alone_says_nothing_of_its_input() {
        // The same input masked by two maskers differs in about every
        // value, and a masked zero vector is spread over the whole ring.
        let maskers = exchanged(SecAggParams::new(1, 3, 2).unwrap(), 40);
        let zeros = vec![0.0f32; 4096];
        let a = maskers[0].mask(&zeros, 0.5).unwrap();
        let b = maskers[1].mask(&zeros, 0.5).unwrap();
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!(same < 3, "{same} equal values");
        let high = a.iter().filter(|&&v| v >= 1 << 31).count();
        assert!(
            (1800..2300).contains(&high),
            "{high} of 4096 in the upper half"
        );
    }

    /// Maskers of one round (secrets from `[slot + salt; 32]`) with their
    /// keys shared and their inboxes read, every share checking out.
    fn exchanged(params: SecAggParams, salt: u8) -> Vec<Masker> {
        let (mut maskers, mut server, sent) = shared(params, salt, 1);
        let inboxes = server.route(sent).unwrap();
        for m in &mut maskers {
            assert!(m.receive_shares(&inboxes[&m.slot()]).unwrap().is_empty());
        }
        maskers
    }

    #[test]
    fn a_masker_reveals_once_and_never_both_secrets_of_one_slot() {
        let mut maskers = exchanged(SecAggParams::new(2, 4, 3).unwrap(), 0);
        let m = &mut maskers[0];
        assert_eq!(
            m.reveal(&[1, 2, 3], &[3, 4]).unwrap_err(),
            SecAggError::Slot(3)
        );
        assert_eq!(
            m.reveal(&[2, 3, 4], &[1]).unwrap_err(),
            SecAggError::Slot(1)
        );
        assert_eq!(m.reveal(&[1, 2, 3], &[]).unwrap_err(), SecAggError::Slot(4));
        assert!(m.reveal(&[1, 2, 3], &[4]).is_ok());
        assert!(matches!(
            m.reveal(&[1, 2, 3], &[4]),
            Err(SecAggError::Order(_))
        ));
    }

    #[test]
    fn two_survivors_of_three_are_not_unmasked() {
        // Their sum, less one colluding survivor's result, would be the
        // other's.
        let mut maskers = exchanged(SecAggParams::new(6, 3, 2).unwrap(), 0);
        let err = maskers[0].reveal(&[1, 2], &[3]).unwrap_err();
        assert!(matches!(err, SecAggError::TooFew { got: 2, .. }), "{err}");
    }

    #[test]
    fn a_tampered_share_is_left_out_and_the_round_still_unmasks() {
        // Masker 2 sends masker 1 a share that does not decrypt: masker 1
        // keeps masking against 2 (the mask comes from the roster's keys)
        // and the round's mean comes out right.
        let n = 4;
        let params = SecAggParams::new(5, n, 3).unwrap();
        let (mut maskers, mut server, sent) = shared(params, 9, 64);
        let mut inboxes = server.route(sent).unwrap();
        let to_one = inboxes.get_mut(&1).unwrap();
        let from_two = to_one.iter_mut().find(|s| s.from == 2).unwrap();
        from_two.ciphertext[10] ^= 1;
        for m in &mut maskers {
            let refused = m.receive_shares(&inboxes[&m.slot()]).unwrap();
            assert_eq!(refused, if m.slot() == 1 { vec![2] } else { vec![] });
            assert_eq!(m.sharers(), vec![1, 2, 3, 4]);
        }
        let inputs = inputs(n as usize, 64);
        let revealed = mask_and_reveal(&mut maskers, &mut server, &inputs);
        // Masker 1 lacks 2's seed share; the others' three suffice.
        assert_eq!(revealed[&1].len(), 3);
        let (mean, _) = server.finish(&revealed).unwrap();
        assert_close(&mean, &weighted_mean(&inputs, &[]));
    }

    #[test]
    fn a_masker_whose_shares_decrypt_for_no_one_is_named_by_the_failure() {
        // The bug: a masker sending every other masker garbage made each
        // secure round fail, for ever, and was never identified.
        let n = 5;
        let params = SecAggParams::new(8, n, 3).unwrap();
        let (mut maskers, mut server, sent) = shared(params, 4, 16);
        let mut inboxes = server.route(sent).unwrap();
        for inbox in inboxes.values_mut() {
            for share in inbox.iter_mut().filter(|s| s.from == 2) {
                share.ciphertext[5] ^= 0x5a;
            }
        }
        for m in &mut maskers {
            m.receive_shares(&inboxes[&m.slot()]).unwrap();
        }
        let inputs = inputs(n as usize, 16);
        let revealed = mask_and_reveal(&mut maskers, &mut server, &inputs);

        let failure = server.finish(&revealed).unwrap_err();

        assert!(
            matches!(
                failure,
                SecAggError::Unrecoverable {
                    slot: 2,
                    got: 1,
                    revealers: 5,
                    threshold: 3
                }
            ),
            "{failure}"
        );
        assert_eq!(failure.suspect(), Some(2));
    }

    #[test]
    fn too_few_revealers_blame_no_masker() {
        let n = 4;
        let params = SecAggParams::new(9, n, 3).unwrap();
        let (mut maskers, mut server, sent) = shared(params, 6, 16);
        let inboxes = server.route(sent).unwrap();
        for m in &mut maskers {
            m.receive_shares(&inboxes[&m.slot()]).unwrap();
        }
        let inputs = inputs(n as usize, 16);
        let mut revealed = mask_and_reveal(&mut maskers, &mut server, &inputs);
        revealed.retain(|&slot, _| slot <= 2);

        let failure = server.finish(&revealed).unwrap_err();

        assert!(
            matches!(failure, SecAggError::TooFew { got: 2, .. }),
            "{failure}"
        );
        assert_eq!(failure.suspect(), None);
    }

    #[test]
    fn a_wrong_or_repeated_revealed_share_is_stepped_around() {
        // Five maskers, threshold 3: revealer 1 sends a garbage share of
        // masker 2's seed, twice; the commitment catches the rebuild that
        // uses it and another set of shares gives the right seed.
        let n = 5;
        let params = SecAggParams::new(8, n, 3).unwrap();
        let (mut maskers, mut server, sent) = shared(params, 20, 32);
        let inboxes = server.route(sent).unwrap();
        for m in &mut maskers {
            m.receive_shares(&inboxes[&m.slot()]).unwrap();
        }
        let inputs = inputs(n as usize, 32);
        let mut revealed = mask_and_reveal(&mut maskers, &mut server, &inputs);
        let lies = revealed.get_mut(&1).unwrap();
        let bad = lies.iter_mut().find(|r| r.of == 2).unwrap();
        bad.share[5] ^= 0x5a;
        let again = bad.clone();
        lies.push(again);
        let (mean, _) = server.finish(&revealed).unwrap();
        assert_close(&mean, &weighted_mean(&inputs, &[]));
    }

    #[test]
    fn a_low_order_key_stays_out_of_the_roster() {
        let params = SecAggParams::new(1, 3, 2).unwrap();
        let maskers: Vec<Masker> = (1..=3)
            .map(|s| Masker::new(params, s, [s as u8; 32]).unwrap())
            .collect();
        let mut keys: Vec<_> = maskers.iter().map(Masker::keys).collect();
        keys[2].mask_key = [0; 32];
        let mut server = Unmasker::new(params, 4);
        let roster = server.roster(&keys).unwrap();
        assert_eq!(roster.iter().map(|k| k.slot).collect::<Vec<_>>(), [1, 2]);
        assert!(check_roster(&params, &keys).is_err());
    }

    #[test]
    fn the_server_leaves_out_a_sharer_whose_shares_are_incomplete() {
        let params = SecAggParams::new(4, 4, 2).unwrap();
        let (_, mut server, mut sent) = shared(params, 0, 8);
        sent.get_mut(&4).unwrap().pop();
        let inboxes = server.route(sent).unwrap();
        assert_eq!(server.sharers(), vec![1, 2, 3]);
        assert!(inboxes[&1].iter().all(|s| s.from != 4));
        assert!(server.add_masked(4, &[0; 8], 0.25).is_err());
    }

    #[test]
    fn parameters_and_values_are_checked() {
        assert!(SecAggParams::new(1, 0, 1).is_err());
        assert!(SecAggParams::new(1, 256, 100).is_err());
        assert!(SecAggParams::new(1, 5, 1).is_err());
        assert!(SecAggParams::new(1, 5, 6).is_err());
        assert_eq!(SecAggParams::majority(1, 10).unwrap().threshold, 6);
        // A quorum is a share of the maskers, rounded up, never under the
        // majority; nonsense fractions are refused.
        assert_eq!(SecAggParams::quorum(1, 10, 0.9).unwrap().threshold, 9);
        assert_eq!(SecAggParams::quorum(1, 200, 0.9).unwrap().threshold, 180);
        assert_eq!(SecAggParams::quorum(1, 10, 0.85).unwrap().threshold, 9);
        assert_eq!(SecAggParams::quorum(1, 10, 0.1).unwrap().threshold, 6);
        assert_eq!(SecAggParams::quorum(1, 10, 1.0).unwrap().threshold, 10);
        assert_eq!(SecAggParams::quorum(1, 1, 1.0).unwrap().threshold, 1);
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            assert!(SecAggParams::quorum(1, 10, bad).is_err(), "{bad}");
        }
        assert_eq!(decode_value(encode_value(-1.5)), -1.5);
        assert_eq!(decode_value(encode_value(1e9)), MAX_VALUE);
        assert!(Masker::new(SecAggParams::majority(1, 3).unwrap(), 4, [0; 32]).is_err());
    }

    /// The test vector of docs/PROTOCOL.md ("Secure aggregation"): a
    /// client in another language checks its key agreement, derivation and
    /// keystream against these values.
    #[test]
    fn the_documented_test_vector_holds() {
        let one = StaticSecret::from([1u8; 32]);
        let two = StaticSecret::from([2u8; 32]);
        let two_public = PublicKey::from(&two).to_bytes();
        assert_eq!(
            hex::encode(PublicKey::from(&one).to_bytes()),
            "a4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a209"
        );
        assert_eq!(
            hex::encode(two_public),
            "ce8d3ad1ccb633ec7b70c17814a5c76ecd029685050d344745ba05870e587d59"
        );
        let seed = agreed_key(&one, &two_public, &mask_info(3, 1, 2));
        assert_eq!(
            hex::encode(seed),
            "ef7bf75b5cb2318efb60ad17928dd36972bd3f207ea2a444179e761a69e2af5e"
        );
        let mut words = vec![0u32; 4];
        apply_keystream(&mut words, &seed, true);
        assert_eq!(words, [2731747467, 610553326, 1894569383, 2733239432]);
        assert_eq!(
            [encode_value(0.5), encode_value(-0.25), encode_value(0.125)],
            [524288, 4294705152, 131072]
        );
    }

    #[test]
    fn messages_travel_as_hex_json() {
        let keys = AdvertisedKeys {
            slot: 2,
            cipher_key: [0xab; 32],
            mask_key: [1; 32],
            seed_commitment: [7; 32],
        };
        let text = serde_json::to_string(&keys).unwrap();
        assert!(text.contains(&"ab".repeat(32)), "{text}");
        assert_eq!(serde_json::from_str::<AdvertisedKeys>(&text).unwrap(), keys);
        let long = format!(
            r#"{{"of":1,"kind":"self-mask","share":"{}"}}"#,
            "00".repeat(200)
        );
        assert!(serde_json::from_str::<RevealedShare>(&long).is_err());
    }
}
