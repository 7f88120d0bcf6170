//! Format 3 of a decision record: the compact binary form the journal stores and the chain
//! hashes (issue 16). A record body is about a quarter of its JSON form: hashes, ids and
//! times as bytes, the vector in the bundle's schema order (the names live in the bundle,
//! found by its digest), reasons as feature indexes and contributions (a reason's value is
//! the vector's entry at its index).
//!
//! Layout, little-endian, in this order (`str` is a u8 length then UTF-8; `opt` is a u8 tag,
//! 0 for none, then the value; `zz` is a signed integer zigzag-mapped and written as a
//! minimal LEB128 varint):
//!
//! | field | bytes |
//! | --- | --- |
//! | format (= 3) | u8 |
//! | decision_id | 16 (UUID) |
//! | recorded_at | i64, µs since the Unix epoch (the body's RFC 3339 text, exactly) |
//! | request_id | str |
//! | request_hash | 32 |
//! | customer_ref | 32 (HMAC-SHA256) |
//! | key_id | str |
//! | model, version | str, str |
//! | digest | 32 (the hex after `sha256:`) |
//! | rollout_id | opt 16 (UUID) |
//! | arm | u8: 0 champion, 1 candidate, 2 shadow |
//! | features | u16 n; a bitmap of ⌈n/8⌉ bytes (bit i set: value i is an f64); then each value in schema order: 8 bytes of f64, or `zz` of its integer |
//! | probability_of_default | f64 |
//! | grade | str |
//! | decision | u8: 0 approve, 1 review, 2 decline |
//! | current_limit | opt `zz` |
//! | granted_limit | `zz` |
//! | reasons | u8 n, then n × (u16 feature index, f64 contribution) |
//! | caller | opt str |
//! | trace_id | opt 16 |
//!
//! A value is written as an integer exactly when it is integral, below 2^53 in magnitude and
//! not negative zero: then the integer gives back its very bits. Credit vectors are mostly
//! such values (amounts, counts, months late), which makes the shipped 21-feature vector
//! ~45 bytes rather than 168. Reading refuses any other choice (an f64 that should be an integer, a
//! varint longer than it needs), so that one body has one encoding.
//!
//! Format 2, written until format 3 replaced it and still read, differs only in the vector
//! (`u16 n`, then n × f64) and the limits (`opt i64`, `i64`).
//!
//! A remediation's fields (`remediates`, `pre_harm_limit`, `reason`) have no place here:
//! encoding refuses a body with any of them, so it is stored as format 1.
//!
//! Encoding refuses a body whose text fields are not in the canonical form the server writes
//! (lowercase hex, hyphenated lowercase UUIDs, RFC 3339 with microseconds, a reason whose
//! value is not the vector's): such a record cannot be rebuilt bit for bit from its bytes, so
//! it must keep its own form (a migrated log's records keep their JSON and their hashes).

use std::collections::BTreeMap;
use std::sync::Arc;
#[cfg(test)]
use std::time::SystemTime;
use std::time::{Duration, UNIX_EPOCH};

use super::{RecordBody, RecordedReason};

/// The format byte of this encoding: what new records are written in.
pub const FORMAT: u8 = 3;
/// The binary format before it (the vector as packed f64): read, no longer written.
pub const FORMAT_2: u8 = 2;

/// Whether a record whose first byte is `first` is binary (format 2 or 3), not JSON.
pub fn is_binary(first: Option<&u8>) -> bool {
    matches!(first, Some(&(FORMAT | FORMAT_2)))
}

/// 10000-01-01T00:00:00Z in µs since the epoch: the first time RFC 3339 cannot write.
const END_OF_9999: i64 = 253_402_300_800_000_000;

/// 2^53: below it in magnitude every integer is an f64 exactly.
const EXACT: f64 = 9_007_199_254_740_992.0;

/// The integer format 3 writes `v` as, if it is one (module doc).
fn as_integer(v: f64) -> Option<i64> {
    (v.fract() == 0.0 && v.abs() < EXACT && !(v == 0.0 && v.is_sign_negative())).then_some(v as i64)
}

fn zigzag(k: i64) -> u64 {
    ((k << 1) ^ (k >> 63)) as u64
}

fn unzigzag(u: u64) -> i64 {
    ((u >> 1) as i64) ^ -((u & 1) as i64)
}

fn put_zz(w: &mut Vec<u8>, k: i64) {
    let mut u = zigzag(k);
    while u >= 0x80 {
        w.push(u as u8 | 0x80);
        u >>= 7;
    }
    w.push(u as u8);
}

/// Appends a vector of `n` values in format 3; refused if `n` does not fit its u16.
fn put_features(
    w: &mut Vec<u8>,
    n: usize,
    x: impl Iterator<Item = f64>,
) -> Result<(), RecordError> {
    let count = u16::try_from(n).map_err(|_| not_canonical("features", "too many"))?;
    w.extend_from_slice(&count.to_le_bytes());
    let map = w.len();
    w.resize(map + n.div_ceil(8), 0);
    for (i, v) in x.enumerate() {
        match as_integer(v) {
            Some(k) => put_zz(w, k),
            None => {
                w[map + i / 8] |= 1 << (i % 8);
                w.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    Ok(())
}

/// Why a body cannot be encoded, or bytes cannot be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordError {
    #[error("{field} is not in canonical form: {why}")]
    NotCanonical { field: &'static str, why: String },
    #[error("record bytes end early, reading {0}")]
    Truncated(&'static str),
    #[error("record format {0} is not known")]
    Format(u8),
    #[error("record field {field}: {why}")]
    Invalid { field: &'static str, why: String },
    #[error("{0} bytes follow the record's last field")]
    Trailing(usize),
}

fn not_canonical(field: &'static str, why: impl Into<String>) -> RecordError {
    RecordError::NotCanonical {
        field,
        why: why.into(),
    }
}

/// Encodes a body; `schema` is the deciding bundle's feature names in schema order (every
/// recorded feature must be one of them, and every one of them recorded).
pub fn encode(body: &RecordBody, schema: &[String]) -> Result<Vec<u8>, RecordError> {
    // A remediation's fields have no place in this layout: such a (rare) body keeps its JSON.
    let extra = [
        ("remediates", body.remediates.is_some()),
        ("pre_harm_limit", body.pre_harm_limit.is_some()),
        ("reason", body.reason.is_some()),
    ];
    if let Some((field, _)) = extra.iter().find(|(_, set)| *set) {
        return Err(not_canonical(field, "the binary format has no such field"));
    }
    let mut w = Vec::with_capacity(256 + 8 * schema.len());
    w.push(FORMAT);
    w.extend_from_slice(&uuid_bytes("decision_id", &body.decision_id)?);
    w.extend_from_slice(&micros("recorded_at", &body.recorded_at)?.to_le_bytes());
    put_str(&mut w, "request_id", &body.request_id)?;
    w.extend_from_slice(&hex32("request_hash", &body.request_hash)?);
    w.extend_from_slice(&hex32("customer_ref", &body.customer_ref)?);
    put_str(&mut w, "key_id", &body.key_id)?;
    put_str(&mut w, "model", &body.model)?;
    put_str(&mut w, "version", &body.version)?;
    let digest = body
        .digest
        .strip_prefix("sha256:")
        .ok_or_else(|| not_canonical("digest", "does not start with sha256:"))?;
    w.extend_from_slice(&hex32("digest", digest)?);
    match &body.rollout_id {
        None => w.push(0),
        Some(id) => {
            w.push(1);
            w.extend_from_slice(&uuid_bytes("rollout_id", id)?);
        }
    }
    w.push(match body.arm.as_str() {
        "champion" => 0,
        "candidate" => 1,
        "shadow" => 2,
        other => return Err(not_canonical("arm", format!("unknown arm {other:?}"))),
    });
    if body.features.len() != schema.len() {
        return Err(not_canonical(
            "features",
            format!(
                "{} recorded, the schema has {}",
                body.features.len(),
                schema.len()
            ),
        ));
    }
    let (x, in_order) = in_schema_order(&body.features, schema)
        .map_err(|name| not_canonical("features", format!("{name} is not recorded")))?;
    put_features(&mut w, x.len(), x.iter().copied())?;
    w.extend_from_slice(&body.probability_of_default.to_le_bytes());
    put_str(&mut w, "grade", &body.grade)?;
    w.push(match body.decision.as_str() {
        "approve" => 0,
        "review" => 1,
        "decline" => 2,
        other => return Err(not_canonical("decision", format!("unknown {other:?}"))),
    });
    put_limits(&mut w, body.current_limit, body.granted_limit);
    let n = u8::try_from(body.reasons.len()).map_err(|_| not_canonical("reasons", "too many"))?;
    w.push(n);
    for r in &body.reasons {
        let i = feature_index(schema, in_order, &r.feature)
            .ok_or_else(|| not_canonical("reasons", format!("{} is no feature", r.feature)))?;
        if x[i].to_bits() != r.value.to_bits() {
            return Err(not_canonical(
                "reasons",
                format!("{}'s value is not the vector's", r.feature),
            ));
        }
        w.extend_from_slice(&(i as u16).to_le_bytes());
        w.extend_from_slice(&r.contribution.to_le_bytes());
    }
    match &body.caller {
        None => w.push(0),
        Some(c) => {
            w.push(1);
            put_str(&mut w, "caller", c)?;
        }
    }
    match &body.trace_id {
        None => w.push(0),
        Some(t) => {
            w.push(1);
            w.extend_from_slice(&hex16("trace_id", t)?);
        }
    }
    Ok(w)
}

/// A decision's record as the recorder makes it: typed, the vector in the deciding bundle's
/// schema order, so that the writer puts format 3 together without parsing any text (the
/// text form, [`RecordBody`], is what readers get back).
#[derive(Debug, Clone, PartialEq)]
pub struct CompactBody {
    pub decision_id: [u8; 16],
    /// µs since the Unix epoch.
    pub recorded_at: i64,
    pub request_id: String,
    pub request_hash: [u8; 32],
    pub customer_ref: [u8; 32],
    pub key_id: String,
    pub model: String,
    pub version: String,
    pub digest: [u8; 32],
    pub rollout_id: Option<[u8; 16]>,
    /// An index into [`ARMS`].
    pub arm: u8,
    /// The bundle's feature names in schema order, shared by its records.
    pub names: Arc<[String]>,
    /// The vector as scored, in schema order.
    pub x: Vec<f64>,
    pub probability_of_default: f64,
    pub grade: String,
    /// An index into [`DECISIONS`].
    pub decision: u8,
    pub current_limit: Option<i64>,
    pub granted_limit: i64,
    /// (schema index, contribution); each reason's value is the vector's.
    pub reasons: Vec<(u16, f64)>,
    pub caller: Option<String>,
    pub trace_id: Option<[u8; 16]>,
}

impl CompactBody {
    pub fn is_shadow(&self) -> bool {
        self.arm == 2
    }

    /// The same record in text form.
    pub fn body(&self) -> RecordBody {
        let name = |i: u16| self.names[usize::from(i)].clone();
        RecordBody {
            decision_id: uuid::Uuid::from_bytes(self.decision_id).to_string(),
            recorded_at: rfc3339(self.recorded_at),
            request_id: self.request_id.clone(),
            request_hash: hex::encode(self.request_hash),
            customer_ref: hex::encode(self.customer_ref),
            key_id: self.key_id.clone(),
            model: self.model.clone(),
            version: self.version.clone(),
            digest: format!("sha256:{}", hex::encode(self.digest)),
            rollout_id: self
                .rollout_id
                .map(|id| uuid::Uuid::from_bytes(id).to_string()),
            arm: ARMS[usize::from(self.arm)].to_string(),
            features: self
                .names
                .iter()
                .cloned()
                .zip(self.x.iter().copied())
                .collect(),
            probability_of_default: self.probability_of_default,
            grade: self.grade.clone(),
            decision: DECISIONS[usize::from(self.decision)].to_string(),
            current_limit: self.current_limit,
            granted_limit: self.granted_limit,
            reasons: self
                .reasons
                .iter()
                .map(|&(i, contribution)| RecordedReason {
                    feature: name(i),
                    contribution,
                    value: self.x[usize::from(i)],
                })
                .collect(),
            caller: self.caller.clone(),
            trace_id: self.trace_id.map(hex::encode),
            remediates: None,
            pre_harm_limit: None,
            reason: None,
        }
    }
}

/// How a bundle's schema order maps onto the order of the names stored for its digest.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredOrder {
    /// For each stored position, the schema index it holds.
    schema_index: Vec<u16>,
    /// For each schema index, its stored position.
    stored_index: Vec<u16>,
}

impl StoredOrder {
    /// None unless `stored` names exactly the features of `schema`, each once.
    pub fn new(stored: &[String], schema: &[String]) -> Option<StoredOrder> {
        if stored.len() != schema.len() || schema.len() > usize::from(u16::MAX) {
            return None;
        }
        let mut stored_index = vec![u16::MAX; schema.len()];
        let mut schema_index = Vec::with_capacity(stored.len());
        for (at, name) in stored.iter().enumerate() {
            let i = schema.iter().position(|n| n == name)?;
            if stored_index[i] != u16::MAX {
                return None;
            }
            stored_index[i] = at as u16;
            schema_index.push(i as u16);
        }
        Some(StoredOrder {
            schema_index,
            stored_index,
        })
    }
}

/// Appends the format-3 bytes of `c` to `w`: the same bytes [`encode`] gives for its text
/// form. Refused (and `w` left as it was) where format 3 cannot hold it: a text field over
/// 255 bytes, a code out of range, a vector or reason that does not fit `order`.
pub fn encode_compact(
    c: &CompactBody,
    order: &StoredOrder,
    w: &mut Vec<u8>,
) -> Result<(), RecordError> {
    let start = w.len();
    let written = put_compact(c, order, w);
    if written.is_err() {
        w.truncate(start);
    }
    written
}

fn put_compact(c: &CompactBody, order: &StoredOrder, w: &mut Vec<u8>) -> Result<(), RecordError> {
    if usize::from(c.arm) >= ARMS.len() || usize::from(c.decision) >= DECISIONS.len() {
        return Err(not_canonical("arm", "code out of range"));
    }
    if c.x.len() != order.schema_index.len() {
        return Err(not_canonical(
            "features",
            "the vector does not fit the names",
        ));
    }
    w.reserve(200 + 9 * c.x.len());
    w.push(FORMAT);
    w.extend_from_slice(&c.decision_id);
    w.extend_from_slice(&c.recorded_at.to_le_bytes());
    put_str(w, "request_id", &c.request_id)?;
    w.extend_from_slice(&c.request_hash);
    w.extend_from_slice(&c.customer_ref);
    put_str(w, "key_id", &c.key_id)?;
    put_str(w, "model", &c.model)?;
    put_str(w, "version", &c.version)?;
    w.extend_from_slice(&c.digest);
    match &c.rollout_id {
        None => w.push(0),
        Some(id) => {
            w.push(1);
            w.extend_from_slice(id);
        }
    }
    w.push(c.arm);
    put_features(
        w,
        c.x.len(),
        order.schema_index.iter().map(|&i| c.x[usize::from(i)]),
    )?;
    w.extend_from_slice(&c.probability_of_default.to_le_bytes());
    put_str(w, "grade", &c.grade)?;
    w.push(c.decision);
    put_limits(w, c.current_limit, c.granted_limit);
    let n = u8::try_from(c.reasons.len()).map_err(|_| not_canonical("reasons", "too many"))?;
    w.push(n);
    for &(i, contribution) in &c.reasons {
        let at = order
            .stored_index
            .get(usize::from(i))
            .ok_or_else(|| not_canonical("reasons", format!("feature index {i}")))?;
        w.extend_from_slice(&at.to_le_bytes());
        w.extend_from_slice(&contribution.to_le_bytes());
    }
    match &c.caller {
        None => w.push(0),
        Some(caller) => {
            w.push(1);
            put_str(w, "caller", caller)?;
        }
    }
    match &c.trace_id {
        None => w.push(0),
        Some(t) => {
            w.push(1);
            w.extend_from_slice(t);
        }
    }
    Ok(())
}

/// The vector's values in the order of `names` (which must name each feature once), and
/// whether that is the map's own order; the name missing from the map if one is. Stored
/// names are sorted, as the map iterates, so the values usually come without a lookup each.
pub(super) fn in_schema_order<'a>(
    features: &BTreeMap<String, f64>,
    names: &'a [String],
) -> Result<(Vec<f64>, bool), &'a str> {
    if features.len() == names.len() && features.keys().zip(names).all(|(k, n)| k == n) {
        return Ok((features.values().copied().collect(), true));
    }
    let mut x = Vec::with_capacity(names.len());
    for n in names {
        x.push(*features.get(n).ok_or(n.as_str())?);
    }
    Ok((x, false))
}

/// Where `feature` is in `names`; `sorted` says [`in_schema_order`] found them sorted.
pub(super) fn feature_index(names: &[String], sorted: bool, feature: &str) -> Option<usize> {
    if sorted {
        names.binary_search_by(|n| n.as_str().cmp(feature)).ok()
    } else {
        names.iter().position(|n| n == feature)
    }
}

/// The bundle digest a record names (`sha256:<hex>`): the caller needs it to find the
/// feature names before [`decode`].
pub fn digest_of(bytes: &[u8]) -> Result<String, RecordError> {
    Ok(Fields::read(bytes)?.digest_text())
}

/// A binary record (format 3 or 2) read in place: every field borrowed from the bytes, nothing decoded
/// that a reader does not ask for. The indexer writes view rows from it and the tail selects
/// records by it, neither of which needs the text form.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    /// The fields before the vector, read as `f.decision_id` and so on (through `Deref`).
    head: Head<'a>,
    /// The vector, in the order of the names stored for the digest.
    features: Vector<'a>,
    pub probability_of_default: f64,
    pub grade: &'a str,
    /// 0 approve, 1 review, 2 decline.
    pub decision: u8,
    pub current_limit: Option<i64>,
    pub granted_limit: i64,
    /// n × (u16 feature index, f64 contribution), little-endian.
    reasons: &'a [u8],
    pub caller: Option<&'a str>,
    pub trace_id: Option<&'a [u8; 16]>,
}

/// A record's vector as its bytes hold it (checked by [`Fields::read`]).
#[derive(Debug, Clone, Copy)]
struct Vector<'a> {
    n: usize,
    /// Format 3: which values are f64 (else an integer). None for format 2, all f64.
    map: Option<&'a [u8]>,
    values: &'a [u8],
}

/// The values of a [`Vector`], in order.
pub struct Values<'a> {
    vector: Vector<'a>,
    i: usize,
    at: usize,
}

impl Iterator for Values<'_> {
    type Item = f64;

    fn next(&mut self) -> Option<f64> {
        let v = &self.vector;
        if self.i == v.n {
            return None;
        }
        let float = v
            .map
            .is_none_or(|m| m[self.i / 8] & (1 << (self.i % 8)) != 0);
        self.i += 1;
        let mut r = Reader {
            bytes: v.values,
            at: self.at,
        };
        // Fields::read took these bytes apart once already: they cannot fail now.
        let x = if float {
            r.f64("features")
        } else {
            r.zz("features").map(|k| k as f64)
        };
        self.at = r.at;
        Some(x.expect("a vector Fields::read checked"))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.vector.n - self.i;
        (left, Some(left))
    }
}

/// The arms the binary formats know, by code.
pub const ARMS: [&str; 3] = ["champion", "candidate", "shadow"];
/// The decisions the binary formats know, by code.
pub const DECISIONS: [&str; 3] = ["approve", "review", "decline"];

/// The fields of a binary record before its vector: what the tail selects records by, read
/// without walking the vector (a tens of nanoseconds against a microsecond for
/// [`Fields::read`]).
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    format: u8,
    pub decision_id: &'a [u8; 16],
    pub recorded_at: i64,
    pub request_id: &'a str,
    pub request_hash: &'a [u8; 32],
    pub customer_ref: &'a [u8; 32],
    pub key_id: &'a str,
    pub model: &'a str,
    pub version: &'a str,
    pub digest: &'a [u8; 32],
    pub rollout_id: Option<&'a [u8; 16]>,
    /// An index into [`ARMS`].
    pub arm: u8,
}

impl<'a> Head<'a> {
    /// Reads the head of binary bytes (checking what it reads, nothing after it).
    pub fn read(bytes: &'a [u8]) -> Result<Head<'a>, RecordError> {
        Head::take(&mut Reader { bytes, at: 0 })
    }

    pub fn is_shadow(&self) -> bool {
        self.arm == 2
    }

    fn take(r: &mut Reader<'a>) -> Result<Head<'a>, RecordError> {
        let format = r.header()?;
        let decision_id = r.array::<16>("decision_id")?;
        let recorded_at = r.i64("recorded_at")?;
        // Text is made of it on every read: a time RFC 3339 cannot write (before 1970, after
        // 9999) is damage, refused here rather than a panic there.
        if !(0..END_OF_9999).contains(&recorded_at) {
            return Err(invalid(
                "recorded_at",
                format!("{recorded_at} µs is not between 1970 and 9999"),
            ));
        }
        let request_id = r.str_ref("request_id")?;
        let request_hash = r.array::<32>("request_hash")?;
        let customer_ref = r.array::<32>("customer_ref")?;
        let key_id = r.str_ref("key_id")?;
        let model = r.str_ref("model")?;
        let version = r.str_ref("version")?;
        let digest = r.array::<32>("digest")?;
        let rollout_id = match r.u8("rollout_id")? {
            0 => None,
            1 => Some(r.array::<16>("rollout_id")?),
            t => return Err(invalid("rollout_id", format!("tag {t}"))),
        };
        let arm = r.u8("arm")?;
        if usize::from(arm) >= ARMS.len() {
            return Err(invalid("arm", format!("code {arm}")));
        }
        Ok(Head {
            format,
            decision_id,
            recorded_at,
            request_id,
            request_hash,
            customer_ref,
            key_id,
            model,
            version,
            digest,
            rollout_id,
            arm,
        })
    }
}

impl<'a> std::ops::Deref for Fields<'a> {
    type Target = Head<'a>;

    fn deref(&self) -> &Head<'a> {
        &self.head
    }
}

impl<'a> Fields<'a> {
    /// Reads the fields of binary bytes (checking their framing, not their names).
    pub fn read(bytes: &'a [u8]) -> Result<Fields<'a>, RecordError> {
        let mut r = Reader { bytes, at: 0 };
        let head = Head::take(&mut r)?;
        let format = head.format;
        let n = usize::from(r.u16("features")?);
        let features = if format == FORMAT_2 {
            Vector {
                n,
                map: None,
                values: r.take(8 * n, "features")?,
            }
        } else {
            r.vector(n)?
        };
        let probability_of_default = r.f64("probability_of_default")?;
        let grade = r.str_ref("grade")?;
        let decision = r.u8("decision")?;
        if usize::from(decision) >= DECISIONS.len() {
            return Err(invalid("decision", format!("code {decision}")));
        }
        let limit = |r: &mut Reader<'a>, what| {
            if format == FORMAT_2 {
                r.i64(what)
            } else {
                r.zz(what)
            }
        };
        let current_limit = match r.u8("current_limit")? {
            0 => None,
            1 => Some(limit(&mut r, "current_limit")?),
            t => return Err(invalid("current_limit", format!("tag {t}"))),
        };
        let granted_limit = limit(&mut r, "granted_limit")?;
        let n_reasons = usize::from(r.u8("reasons")?);
        let reasons = r.take(10 * n_reasons, "reasons")?;
        for k in 0..n_reasons {
            let i = usize::from(u16::from_le_bytes([reasons[10 * k], reasons[10 * k + 1]]));
            if i >= n {
                return Err(invalid("reasons", format!("feature index {i}")));
            }
        }
        let caller = match r.u8("caller")? {
            0 => None,
            1 => Some(r.str_ref("caller")?),
            t => return Err(invalid("caller", format!("tag {t}"))),
        };
        let trace_id = match r.u8("trace_id")? {
            0 => None,
            1 => Some(r.array::<16>("trace_id")?),
            t => return Err(invalid("trace_id", format!("tag {t}"))),
        };
        if r.at != bytes.len() {
            return Err(RecordError::Trailing(bytes.len() - r.at));
        }
        Ok(Fields {
            head,
            features,
            probability_of_default,
            grade,
            decision,
            current_limit,
            granted_limit,
            reasons,
            caller,
            trace_id,
        })
    }

    /// How many features the vector has.
    pub fn feature_count(&self) -> usize {
        self.features.n
    }

    /// The vector, in the order of the names stored for the digest.
    pub fn features(&self) -> Values<'a> {
        Values {
            vector: self.features,
            i: 0,
            at: 0,
        }
    }

    /// The reasons: (feature index into the vector, contribution), in their order.
    pub fn reasons(&self) -> impl Iterator<Item = (usize, f64)> + 'a {
        self.reasons.chunks_exact(10).map(|c| {
            (
                usize::from(u16::from_le_bytes([c[0], c[1]])),
                f64::from_le_bytes(c[2..].try_into().expect("8")),
            )
        })
    }

    /// `sha256:<hex>`, as the body's digest reads.
    pub fn digest_text(&self) -> String {
        format!("sha256:{}", hex::encode(self.digest))
    }

    /// The body; `schema` gives the feature names stored for the digest.
    pub fn body(&self, schema: &[String]) -> Result<RecordBody, RecordError> {
        let n = self.feature_count();
        if n != schema.len() {
            return Err(invalid(
                "features",
                format!("{n} recorded, the bundle's schema has {}", schema.len()),
            ));
        }
        let x: Vec<f64> = self.features().collect();
        let reasons = self
            .reasons()
            .map(|(i, contribution)| RecordedReason {
                feature: schema[i].clone(),
                contribution,
                value: x[i],
            })
            .collect();
        Ok(RecordBody {
            decision_id: uuid::Uuid::from_bytes(*self.decision_id).to_string(),
            recorded_at: rfc3339(self.recorded_at),
            request_id: self.request_id.to_string(),
            request_hash: hex::encode(self.request_hash),
            customer_ref: hex::encode(self.customer_ref),
            key_id: self.key_id.to_string(),
            model: self.model.to_string(),
            version: self.version.to_string(),
            digest: self.digest_text(),
            rollout_id: self
                .rollout_id
                .map(|id| uuid::Uuid::from_bytes(*id).to_string()),
            arm: ARMS[usize::from(self.arm)].to_string(),
            features: schema.iter().cloned().zip(x).collect(),
            probability_of_default: self.probability_of_default,
            grade: self.grade.to_string(),
            decision: DECISIONS[usize::from(self.decision)].to_string(),
            current_limit: self.current_limit,
            granted_limit: self.granted_limit,
            reasons,
            caller: self.caller.map(str::to_string),
            trace_id: self.trace_id.map(hex::encode),
            remediates: None,
            pre_harm_limit: None,
            reason: None,
        })
    }
}

/// Decodes a record; `schema` gives the feature names of the bundle its digest names.
pub fn decode(bytes: &[u8], schema: &[String]) -> Result<RecordBody, RecordError> {
    Fields::read(bytes)?.body(schema)
}

fn invalid(field: &'static str, why: impl Into<String>) -> RecordError {
    RecordError::Invalid {
        field,
        why: why.into(),
    }
}

fn put_str(w: &mut Vec<u8>, field: &'static str, s: &str) -> Result<(), RecordError> {
    let n = u8::try_from(s.len())
        .map_err(|_| not_canonical(field, format!("{} bytes, at most 255", s.len())))?;
    w.push(n);
    w.extend_from_slice(s.as_bytes());
    Ok(())
}

/// The current limit (if any) and the granted one, in format 3.
fn put_limits(w: &mut Vec<u8>, current: Option<i64>, granted: i64) {
    match current {
        None => w.push(0),
        Some(v) => {
            w.push(1);
            put_zz(w, v);
        }
    }
    put_zz(w, granted);
}

/// Lowercase hex of exactly `N` bytes.
fn hex_n<const N: usize>(field: &'static str, s: &str) -> Result<[u8; N], RecordError> {
    let mut out = [0u8; N];
    if s.len() != 2 * N || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(not_canonical(
            field,
            format!("not {} lowercase hex digits", 2 * N),
        ));
    }
    hex::decode_to_slice(s, &mut out).map_err(|e| not_canonical(field, e.to_string()))?;
    Ok(out)
}

fn hex32(field: &'static str, s: &str) -> Result<[u8; 32], RecordError> {
    hex_n::<32>(field, s)
}

fn hex16(field: &'static str, s: &str) -> Result<[u8; 16], RecordError> {
    hex_n::<16>(field, s)
}

fn uuid_bytes(field: &'static str, s: &str) -> Result<[u8; 16], RecordError> {
    let id = uuid::Uuid::parse_str(s).map_err(|e| not_canonical(field, e.to_string()))?;
    if id.to_string() != s {
        return Err(not_canonical(field, "not a lowercase hyphenated UUID"));
    }
    Ok(*id.as_bytes())
}

/// µs since the epoch of an RFC 3339 time, if formatting them back gives the same text.
fn micros(field: &'static str, s: &str) -> Result<i64, RecordError> {
    let t = humantime::parse_rfc3339(s).map_err(|e| not_canonical(field, e.to_string()))?;
    let us = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| not_canonical(field, "before 1970"))?
        .as_micros();
    let us = i64::try_from(us).map_err(|_| not_canonical(field, "too far ahead"))?;
    if rfc3339(us) != s {
        return Err(not_canonical(field, "not RFC 3339 UTC with microseconds"));
    }
    Ok(us)
}

fn rfc3339(us: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(us.max(0) as u64);
    humantime::format_rfc3339_micros(t).to_string()
}

/// The first byte of a format-1 record: its canonical JSON (`{`).
const JSON_FORMAT: u8 = b'{';

/// A journal entry: `prev_hash (32) | hash (32) | record`, where the record is binary
/// (first byte 3, or 2 before it) or format 1 (canonical JSON, first byte `{`: a migrated record, or
/// a body that is not in canonical form). Genesis, the first record's `prev_hash`, is 32
/// zero bytes.
pub struct Entry<'a> {
    pub prev_hash: String,
    pub hash: String,
    /// The bytes the hash covers.
    pub record: &'a [u8],
}

/// Puts an entry together.
pub fn encode_entry(prev_hash: &str, hash: &[u8; 32], record: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + record.len());
    put_prev_hash(&mut out, prev_hash);
    out.extend_from_slice(hash);
    out.extend_from_slice(record);
    out
}

/// Appends an entry's first field: `prev_hash` as its 32 bytes, genesis as 32 zeros.
pub fn put_prev_hash(out: &mut Vec<u8>, prev_hash: &str) {
    if prev_hash == super::chain::GENESIS {
        out.extend_from_slice(&[0u8; 32]);
    } else {
        let mut prev = [0u8; 32];
        // Every hash the log writes is 64 lowercase hex digits.
        hex::decode_to_slice(prev_hash, &mut prev).expect("a chain hash is 32 bytes of hex");
        out.extend_from_slice(&prev);
    }
}

/// Takes an entry apart.
pub fn decode_entry(payload: &[u8]) -> Result<Entry<'_>, RecordError> {
    if payload.len() <= 64 {
        return Err(RecordError::Truncated("entry"));
    }
    let prev = &payload[..32];
    Ok(Entry {
        prev_hash: if prev.iter().all(|&b| b == 0) {
            super::chain::GENESIS.to_string()
        } else {
            hex::encode(prev)
        },
        hash: hex::encode(&payload[32..64]),
        record: &payload[64..],
    })
}

/// The bytes a body is stored and hashed as: format 3 when `names` (the feature names of
/// the body's bundle, sorted) are given and the body is canonical, format 1 otherwise.
pub fn body_bytes(body: &RecordBody, names: Option<&[String]>) -> Vec<u8> {
    names
        .and_then(|n| encode(body, n).ok())
        .unwrap_or_else(|| serde_json::to_vec(body).expect("a record body always serialises"))
}

/// Reads a record in either format; `names` finds the feature names of a digest.
pub fn decode_body(
    bytes: &[u8],
    names: impl FnOnce(&str) -> Option<std::sync::Arc<Vec<String>>>,
) -> Result<RecordBody, RecordError> {
    match bytes.first() {
        Some(&JSON_FORMAT) => serde_json::from_slice(bytes).map_err(|e| RecordError::Invalid {
            field: "record",
            why: format!("format 1 JSON: {e}"),
        }),
        Some(&(FORMAT | FORMAT_2)) => {
            let digest = digest_of(bytes)?;
            let names = names(&digest).ok_or_else(|| RecordError::Invalid {
                field: "digest",
                why: format!("no feature names are stored for {digest}"),
            })?;
            decode(bytes, &names)
        }
        Some(&f) => Err(RecordError::Format(f)),
        None => Err(RecordError::Truncated("format")),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], RecordError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(RecordError::Truncated(what))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    /// The format byte: 2 or 3.
    fn header(&mut self) -> Result<u8, RecordError> {
        match self.u8("format")? {
            f @ (FORMAT | FORMAT_2) => Ok(f),
            f => Err(RecordError::Format(f)),
        }
    }

    /// A minimal LEB128 varint of a zigzag-mapped i64.
    fn zz(&mut self, what: &'static str) -> Result<i64, RecordError> {
        let mut u: u64 = 0;
        for k in 0..10 {
            let b = self.u8(what)?;
            if k == 9 && b > 1 {
                return Err(invalid(what, "varint over 64 bits"));
            }
            u |= u64::from(b & 0x7f) << (7 * k);
            if b & 0x80 == 0 {
                if b == 0 && k > 0 {
                    return Err(invalid(what, "varint longer than it needs"));
                }
                return Ok(unzigzag(u));
            }
        }
        Err(invalid(what, "varint over 10 bytes"))
    }

    /// A format-3 vector of `n` values, each in the one form format 3 allows it.
    fn vector(&mut self, n: usize) -> Result<Vector<'a>, RecordError> {
        let map = self.take(n.div_ceil(8), "features")?;
        if !n.is_multiple_of(8) && map.last().is_some_and(|&b| b >> (n % 8) != 0) {
            return Err(invalid("features", "bitmap bits past the vector"));
        }
        let start = self.at;
        for i in 0..n {
            if map[i / 8] & (1 << (i % 8)) != 0 {
                if as_integer(self.f64("features")?).is_some() {
                    return Err(invalid(
                        "features",
                        format!("value {i} is an integer stored as f64"),
                    ));
                }
            } else {
                let k = self.zz("features")?;
                if (k as f64).abs() >= EXACT {
                    return Err(invalid("features", format!("value {i} is past 2^53")));
                }
            }
        }
        Ok(Vector {
            n,
            map: Some(map),
            values: &self.bytes[start..self.at],
        })
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, RecordError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, RecordError> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2"),
        ))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, RecordError> {
        Ok(i64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8"),
        ))
    }

    fn f64(&mut self, what: &'static str) -> Result<f64, RecordError> {
        Ok(f64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8"),
        ))
    }

    fn str_ref(&mut self, what: &'static str) -> Result<&'a str, RecordError> {
        let n = usize::from(self.u8(what)?);
        let s = self.take(n, what)?;
        std::str::from_utf8(s).map_err(|_| invalid(what, "not UTF-8"))
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<&'a [u8; N], RecordError> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The shipped v1's feature names, in schema order.
    pub(crate) fn schema() -> Vec<String> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/credit-limit/v1");
        let bundle = crate::bundle::Bundle::load(&dir, None).expect("the shipped v1");
        bundle
            .schema
            .features()
            .iter()
            .map(|f| f.name.clone())
            .collect()
    }

    /// A body as the recorder writes one: canonical text, a Taiwan-like vector, four reasons
    /// whose values are the vector's.
    pub(crate) fn body(schema: &[String]) -> RecordBody {
        let features: BTreeMap<String, f64> = schema
            .iter()
            .enumerate()
            .map(|(i, f)| {
                (
                    f.clone(),
                    if i % 3 == 0 {
                        20_000.0
                    } else {
                        -1.5 + i as f64
                    },
                )
            })
            .collect();
        let reasons = [0usize, 3, 5, 7]
            .iter()
            .map(|&i| RecordedReason {
                feature: schema[i].clone(),
                contribution: 0.1 / (i as f64 + 1.0),
                value: features[&schema[i]],
            })
            .collect();
        RecordBody {
            decision_id: uuid::Uuid::now_v7().to_string(),
            recorded_at: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            request_id: "req-000123".into(),
            request_hash: "ab".repeat(32),
            customer_ref: "0f".repeat(32),
            key_id: "dev-1".into(),
            model: "credit-limit".into(),
            version: "v1".into(),
            digest: format!("sha256:{}", "9c".repeat(32)),
            rollout_id: Some(uuid::Uuid::now_v7().to_string()),
            arm: "candidate".into(),
            features,
            probability_of_default: 0.123_456_789_012_345_67,
            grade: "C".into(),
            decision: "review".into(),
            current_limit: Some(96_000),
            granted_limit: 0,
            reasons,
            caller: Some("limit-service".into()),
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            remediates: None,
            pre_harm_limit: None,
            reason: None,
        }
    }

    #[test]
    fn a_body_round_trips_bit_for_bit_in_a_third_of_its_json() {
        let schema = schema();
        let b = body(&schema);
        let bytes = encode(&b, &schema).unwrap();
        assert_eq!(decode(&bytes, &schema).unwrap(), b);
        assert_eq!(digest_of(&bytes).unwrap(), b.digest);
        let json = serde_json::to_vec(&b).unwrap().len();
        assert!(
            bytes.len() * 3 <= json,
            "{} bytes binary against {json} JSON",
            bytes.len()
        );
        // Every optional field absent round-trips too.
        let bare = RecordBody {
            rollout_id: None,
            current_limit: None,
            caller: None,
            trace_id: None,
            reasons: Vec::new(),
            ..b
        };
        assert_eq!(
            decode(&encode(&bare, &schema).unwrap(), &schema).unwrap(),
            bare
        );
    }

    /// The compact form of a body made by [`body`].
    pub(crate) fn compact(b: &RecordBody, schema: &[String]) -> CompactBody {
        let hex32 = |s: &str| {
            let mut out = [0u8; 32];
            hex::decode_to_slice(s, &mut out).unwrap();
            out
        };
        CompactBody {
            decision_id: *uuid::Uuid::parse_str(&b.decision_id).unwrap().as_bytes(),
            recorded_at: micros("recorded_at", &b.recorded_at).unwrap(),
            request_id: b.request_id.clone(),
            request_hash: hex32(&b.request_hash),
            customer_ref: hex32(&b.customer_ref),
            key_id: b.key_id.clone(),
            model: b.model.clone(),
            version: b.version.clone(),
            digest: hex32(b.digest.strip_prefix("sha256:").unwrap()),
            rollout_id: b
                .rollout_id
                .as_ref()
                .map(|id| *uuid::Uuid::parse_str(id).unwrap().as_bytes()),
            arm: ARMS.iter().position(|a| *a == b.arm).unwrap() as u8,
            names: schema.to_vec().into(),
            x: schema.iter().map(|n| b.features[n]).collect(),
            probability_of_default: b.probability_of_default,
            grade: b.grade.clone(),
            decision: DECISIONS.iter().position(|d| *d == b.decision).unwrap() as u8,
            current_limit: b.current_limit,
            granted_limit: b.granted_limit,
            reasons: b
                .reasons
                .iter()
                .map(|r| {
                    let i = schema.iter().position(|n| *n == r.feature).unwrap();
                    (i as u16, r.contribution)
                })
                .collect(),
            caller: b.caller.clone(),
            trace_id: b.trace_id.as_ref().map(|t| {
                let mut out = [0u8; 16];
                hex::decode_to_slice(t, &mut out).unwrap();
                out
            }),
        }
    }

    #[test]
    fn a_compact_body_encodes_to_the_bytes_of_its_text_form() {
        let schema = schema();
        let b = body(&schema);
        let c = compact(&b, &schema);
        assert_eq!(c.body(), b);
        // Names stored sorted (as every log so far stores them) and in schema order.
        let mut sorted = schema.clone();
        sorted.sort();
        for stored in [sorted, schema.clone()] {
            let order = StoredOrder::new(&stored, &schema).unwrap();
            let mut w = b"prefix".to_vec();
            encode_compact(&c, &order, &mut w).unwrap();
            assert_eq!(&w[..6], b"prefix");
            assert_eq!(w[6..], encode(&b, &stored).unwrap()[..]);
            assert_eq!(decode(&w[6..], &stored).unwrap(), b);
            // A field format 3 cannot hold leaves nothing behind.
            let long = CompactBody {
                caller: Some("x".repeat(256)),
                ..c.clone()
            };
            let mut w = b"prefix".to_vec();
            assert!(matches!(
                encode_compact(&long, &order, &mut w),
                Err(RecordError::NotCanonical {
                    field: "caller",
                    ..
                })
            ));
            assert_eq!(w, b"prefix");
        }
        // Names that are not the schema's features, each once, give no order.
        let mut twice = schema.clone();
        twice[1] = twice[0].clone();
        assert_eq!(StoredOrder::new(&twice, &schema), None);
        assert_eq!(StoredOrder::new(&schema[1..], &schema), None);
    }

    #[test]
    fn text_the_bytes_cannot_reproduce_is_refused() {
        let schema = schema();
        let field = |b: RecordBody| match encode(&b, &schema) {
            Err(RecordError::NotCanonical { field, .. }) => field,
            other => panic!("expected a refusal, got {other:?}"),
        };
        let b = body(&schema);
        assert_eq!(
            field(RecordBody {
                customer_ref: "0F".repeat(32),
                ..b.clone()
            }),
            "customer_ref"
        );
        assert_eq!(
            field(RecordBody {
                decision_id: b.decision_id.to_uppercase(),
                ..b.clone()
            }),
            "decision_id"
        );
        assert_eq!(
            field(RecordBody {
                recorded_at: "2026-12-01T10:00:00Z".into(),
                ..b.clone()
            }),
            "recorded_at"
        );
        assert_eq!(
            field(RecordBody {
                digest: "9c".repeat(32),
                ..b.clone()
            }),
            "digest"
        );
        let mut off = b.clone();
        off.reasons[1].value += 1.0;
        assert_eq!(field(off), "reasons");
        let mut missing = b.clone();
        missing.features.remove(&schema[2]);
        assert_eq!(field(missing), "features");
        assert_eq!(
            field(RecordBody {
                arm: "remediation".into(),
                ..b
            }),
            "arm"
        );
    }

    #[test]
    fn a_remediation_is_stored_as_json_and_older_json_keeps_its_bytes() {
        let schema = schema();
        // A record as a release before the remediation fields wrote it, byte for byte.
        let old = concat!(
            r#"{"decision_id":"0193a1b2-0000-7000-8000-000000000001","#,
            r#""recorded_at":"2026-12-01T10:00:00.000001Z","request_id":"req-1","#,
            r#""request_hash":"ababababababababababababababababababababababababababababababab","#,
            r#""customer_ref":"0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f","#,
            r#""key_id":"dev-1","model":"credit-limit","version":"v2","#,
            r#""digest":"sha256:9c9c","rollout_id":null,"arm":"candidate","#,
            r#""features":{"AGE":24.0,"PAYMENTDELAY_1":2.0},"probability_of_default":0.61,"#,
            r#""grade":"F","decision":"decline","current_limit":96000,"granted_limit":0,"#,
            r#""reasons":[{"feature":"AGE","contribution":1.25,"value":24.0}],"#,
            r#""caller":null,"trace_id":null}"#
        );
        let read = decode_body(old.as_bytes(), |_| None).unwrap();
        assert_eq!(
            (&read.remediates, read.pre_harm_limit, &read.reason),
            (&None, None, &None)
        );
        assert_eq!(
            String::from_utf8(serde_json::to_vec(&read).unwrap()).unwrap(),
            old
        );
        let b = body(&schema);

        let remediation = RecordBody {
            arm: "champion".into(),
            remediates: Some(uuid::Uuid::now_v7().to_string()),
            pre_harm_limit: Some(96_000),
            reason: Some("restore after rollback".into()),
            ..b.clone()
        };
        assert!(matches!(
            encode(&remediation, &schema),
            Err(RecordError::NotCanonical {
                field: "remediates",
                ..
            })
        ));
        let bytes = body_bytes(&remediation, Some(&schema));
        assert_eq!(bytes[0], JSON_FORMAT);
        assert_eq!(decode_body(&bytes, |_| None).unwrap(), remediation);
    }

    #[test]
    fn damaged_bytes_are_an_error_never_a_panic() {
        let schema = schema();
        let bytes = encode(&body(&schema), &schema).unwrap();
        for cut in 0..bytes.len() {
            assert!(
                decode(&bytes[..cut], &schema).is_err(),
                "a record cut at {cut} decoded"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer, &schema), Err(RecordError::Trailing(1)));
        let mut other = bytes.clone();
        other[0] = 9;
        assert_eq!(decode(&other, &schema), Err(RecordError::Format(9)));
        assert!(matches!(
            decode(&bytes, &schema[1..]),
            Err(RecordError::Invalid {
                field: "features",
                ..
            })
        ));
    }

    /// The body of the format-2 bytes below (written by the encoder before format 3).
    fn golden_body(schema: &[String]) -> RecordBody {
        RecordBody {
            decision_id: "0193a5c2-7d1e-7000-8000-000000000001".into(),
            recorded_at: "2026-12-04T14:00:00.123456Z".into(),
            rollout_id: Some("0193a5c2-7d1e-7000-8000-000000000002".into()),
            ..body(schema)
        }
    }

    #[test]
    fn a_format_2_record_still_reads_and_new_ones_are_format_3_and_smaller() {
        let schema = schema();
        let v2 = hex::decode(concat!(
            "020193a5c27d1e70008000000000000001407aba4acf6106000a7265712d303030313233abababababababab",
            "abababababababababababababababababababababababab0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f",
            "0f0f0f0f0f0f0f0f0f0f0f0f056465762d310c6372656469742d6c696d69740276319c9c9c9c9c9c9c9c9c9c",
            "9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c9c010193a5c27d1e700080000000000000020115000000",
            "00000088d340000000000000e0bf000000000000e03f000000000088d3400000000000000440000000000000",
            "0c40000000000088d34000000000000016400000000000001a40000000000088d34000000000000021400000",
            "000000002340000000000088d34000000000000027400000000000002940000000000088d340000000000000",
            "2d400000000000002f40000000000088d340000000000080314000000000008032405ef64637dd9abf3f0143",
            "0101007701000000000000000000000000000400009a9999999999b93f03009a9999999999993f0500111111",
            "111111913f07009a9999999999893f010d6c696d69742d73657276696365014bf92f3577b34da6a3ce929d0e",
            "0e4736",
        ))
        .unwrap();
        assert_eq!(v2[0], FORMAT_2);
        let b = golden_body(&schema);
        assert_eq!(decode(&v2, &schema).unwrap(), b);
        assert_eq!(
            decode_body(&v2, |_| Some(Arc::new(schema.clone()))).unwrap(),
            b
        );
        let f = Fields::read(&v2).unwrap();
        assert_eq!(f.feature_count(), schema.len());
        assert_eq!(f.current_limit, Some(96_000));
        // The same body now: format 3, the same fields, fewer bytes (a third of this vector
        // is integers, 3 bytes each rather than 8, and the limits are varints).
        let v3 = encode(&b, &schema).unwrap();
        assert_eq!(v3[0], FORMAT);
        assert_eq!(decode(&v3, &schema).unwrap(), b);
        assert!(
            v3.len() + 40 <= v2.len(),
            "{} against {} bytes",
            v3.len(),
            v2.len()
        );
    }

    #[test]
    fn every_value_of_a_vector_and_every_limit_round_trips_bit_for_bit() {
        let schema = schema();
        let specials = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            20_000.0,
            0.35,
            -1.5,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            EXACT,
            -EXACT,
            EXACT - 1.0,
            -(EXACT - 1.0),
            1e300,
            5e-324,
            f64::MAX,
            f64::MIN,
        ];
        let b = body(&schema);
        for start in 0..specials.len() {
            let features = schema
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), specials[(start + i) % specials.len()]))
                .collect();
            let reasons = b
                .reasons
                .iter()
                .map(|r| RecordedReason {
                    value: specials[(start + schema.iter().position(|n| *n == r.feature).unwrap())
                        % specials.len()],
                    ..r.clone()
                })
                .collect();
            let limits = [i64::MIN, -1, 0, 63, 64, i64::MAX];
            let x = RecordBody {
                features,
                reasons,
                current_limit: Some(limits[start % limits.len()]),
                granted_limit: limits[(start + 1) % limits.len()],
                ..b.clone()
            };
            let bytes = encode(&x, &schema).unwrap();
            let back = decode(&bytes, &schema).unwrap();
            for (n, v) in &x.features {
                assert_eq!(back.features[n].to_bits(), v.to_bits(), "{n} = {v:e}");
            }
            assert_eq!(
                (back.current_limit, back.granted_limit),
                (x.current_limit, x.granted_limit)
            );
            // The compact form the writer encodes gives the same bytes.
            let order = StoredOrder::new(&schema, &schema).unwrap();
            let mut w = Vec::new();
            encode_compact(&compact(&x, &schema), &order, &mut w).unwrap();
            assert_eq!(w, bytes);
        }
    }

    #[test]
    fn a_value_in_any_form_but_its_own_is_refused() {
        let schema = schema();
        let mut b = body(&schema);
        // The first feature 20000 (an integer), the second 0.5 (an f64), so that the vector
        // starts after the u16 count and a 3-byte bitmap with bit 1 set.
        let names: Vec<String> = schema.clone();
        b.features.insert(names[0].clone(), 20_000.0);
        b.features.insert(names[1].clone(), 0.5);
        for r in &mut b.reasons {
            r.value = b.features[&r.feature];
        }
        let bytes = encode(&b, &schema).unwrap();
        let n_at = bytes.len()
            - bytes
                .windows(2)
                .rev()
                .position(|w| w == (schema.len() as u16).to_le_bytes())
                .unwrap()
            - 2;
        let map = n_at + 2;
        let values = map + schema.len().div_ceil(8);
        assert_eq!(bytes[map] & 0b11, 0b10);
        let refused = |bytes: &[u8]| match decode(bytes, &schema) {
            Err(RecordError::Invalid {
                field: "features",
                why,
            }) => why,
            other => panic!("decoded as {other:?}"),
        };
        // 20000 as an f64 where its integer belongs.
        let mut as_float = bytes[..values].to_vec();
        as_float[map] |= 1;
        as_float.extend_from_slice(&20_000.0f64.to_le_bytes());
        as_float.extend_from_slice(&bytes[values + 3..]);
        assert!(refused(&as_float).contains("integer stored as f64"));
        // 20000 (zigzag 40000: 3 bytes) padded to 4 bytes.
        let mut padded = bytes[..values].to_vec();
        padded.extend_from_slice(&[
            bytes[values],
            bytes[values + 1],
            bytes[values + 2] | 0x80,
            0,
        ]);
        padded.extend_from_slice(&bytes[values + 3..]);
        assert!(refused(&padded).contains("longer than it needs"));
        // A bitmap bit past the vector's last value.
        let mut stray = bytes.clone();
        stray[values - 1] |= 0x80;
        assert!(refused(&stray).contains("past the vector"));
    }

    #[test]
    fn any_flipped_byte_is_an_error_or_a_record_never_a_panic() {
        let schema = schema();
        let bytes = encode(&body(&schema), &schema).unwrap();
        // A time no RFC 3339 text can hold (bytes 17..25) is refused, not a panic in rfc3339.
        for at in [-1i64, END_OF_9999, i64::MAX, i64::MIN] {
            let mut b = bytes.clone();
            b[17..25].copy_from_slice(&at.to_le_bytes());
            assert!(
                matches!(
                    decode(&b, &schema),
                    Err(RecordError::Invalid {
                        field: "recorded_at",
                        ..
                    })
                ),
                "{at}"
            );
        }
        let mut last = bytes.clone();
        last[17..25].copy_from_slice(&(END_OF_9999 - 1).to_le_bytes());
        assert_eq!(
            decode(&last, &schema).unwrap().recorded_at,
            "9999-12-31T23:59:59.999999Z"
        );
        for at in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[at] ^= flip;
                let _ = decode(&b, &schema);
            }
        }
    }
}
