//! Byte formats of replication: a commit's writes (the local journal) and the remote objects
//! that carry them (segments and snapshots).
//!
//! ```text
//! journal:  version u16 (1) | ops
//! ops:      count u32 | (klen u32, key, tag u8 (0 remove, 1 put), [vlen u32, value])*
//! object:   magic "TSRREP01" | kind u8 (1 segment, 2 snapshot) | epoch u64 | first u64 |
//!           last u64 | ops | blake3 of everything before (32 bytes)
//! ```
//! Integers are big-endian. A segment holds the commits `first..=last`, collapsed to the last
//! write of each key (it is applied whole or not at all). A snapshot holds every record as of
//! commit `last` (`first` is 0).

use std::collections::BTreeMap;

const MAGIC: &[u8; 8] = b"TSRREP01";

/// Schema version of a journal entry (the local record of one commit's writes).
const JOURNAL_VERSION: u16 = 1;

pub type Ops = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// A commit's writes in order: (key, new value or `None` for a removal).
pub type OpList = Vec<(Vec<u8>, Option<Vec<u8>>)>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Segment,
    Snapshot,
}

/// A decoded segment or snapshot.
#[derive(Debug, PartialEq)]
pub struct Object {
    pub kind: Kind,
    pub epoch: u64,
    pub first: u64,
    pub last: u64,
    pub ops: Ops,
}

pub fn encode_ops<'a, I>(ops: I) -> Vec<u8>
where
    I: IntoIterator<Item = &'a (Vec<u8>, Option<Vec<u8>>)>,
    I::IntoIter: ExactSizeIterator,
{
    let it = ops.into_iter();
    let mut out = Vec::new();
    out.extend_from_slice(&JOURNAL_VERSION.to_be_bytes());
    out.extend_from_slice(&(it.len() as u32).to_be_bytes());
    for (k, v) in it {
        put_op(&mut out, k, v.as_deref());
    }
    out
}

fn put_op(out: &mut Vec<u8>, k: &[u8], v: Option<&[u8]>) {
    out.extend_from_slice(&(k.len() as u32).to_be_bytes());
    out.extend_from_slice(k);
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v);
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| format!("truncated at byte {}", self.at))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn ops(&mut self) -> Result<OpList, String> {
        let n = self.u32()? as usize;
        let mut out = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let kl = self.u32()? as usize;
            let k = self.take(kl)?.to_vec();
            let v = match self.take(1)?[0] {
                0 => None,
                1 => {
                    let vl = self.u32()? as usize;
                    Some(self.take(vl)?.to_vec())
                }
                t => return Err(format!("unknown write tag {t}")),
            };
            out.push((k, v));
        }
        Ok(out)
    }
}

pub fn decode_ops(b: &[u8]) -> Result<OpList, String> {
    let mut r = Reader { b, at: 0 };
    let version = u16::from_be_bytes(r.take(2)?.try_into().unwrap());
    if version != JOURNAL_VERSION {
        return Err(format!(
            "schema version {version}, but this tsr reads version {JOURNAL_VERSION}; use the tsr release that wrote this store"
        ));
    }
    let ops = r.ops()?;
    if r.at != b.len() {
        return Err(format!("{} trailing bytes", b.len() - r.at));
    }
    Ok(ops)
}

pub fn encode_object(kind: Kind, epoch: u64, first: u64, last: u64, ops: &Ops) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.push(match kind {
        Kind::Segment => 1,
        Kind::Snapshot => 2,
    });
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&first.to_be_bytes());
    out.extend_from_slice(&last.to_be_bytes());
    out.extend_from_slice(&(ops.len() as u32).to_be_bytes());
    for (k, v) in ops {
        put_op(&mut out, k, v.as_deref());
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Decode and check an object: its checksum first, then its shape.
pub fn decode_object(b: &[u8]) -> Result<Object, String> {
    if b.len() < MAGIC.len() + 1 + 24 + 4 + 32 {
        return Err(format!("{} bytes is too short for a segment", b.len()));
    }
    let (body, sum) = b.split_at(b.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err("its checksum does not match its content".into());
    }
    let mut r = Reader { b: body, at: 0 };
    if r.take(8)? != MAGIC {
        return Err("it does not start with TSRREP01".into());
    }
    let kind = match r.take(1)?[0] {
        1 => Kind::Segment,
        2 => Kind::Snapshot,
        k => return Err(format!("unknown object kind {k}")),
    };
    let epoch = r.u64()?;
    let first = r.u64()?;
    let last = r.u64()?;
    let ops: Ops = r.ops()?.into_iter().collect();
    if r.at != body.len() {
        return Err(format!("{} trailing bytes", body.len() - r.at));
    }
    Ok(Object {
        kind,
        epoch,
        first,
        last,
        ops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_round_trip_and_damage_is_found() {
        let mut ops = Ops::new();
        ops.insert(b"Sa".to_vec(), Some(b"one".to_vec()));
        ops.insert(b"Sb".to_vec(), None);
        let b = encode_object(Kind::Segment, 3, 10, 12, &ops);
        let o = decode_object(&b).unwrap();
        assert_eq!(
            (o.kind, o.epoch, o.first, o.last),
            (Kind::Segment, 3, 10, 12)
        );
        assert_eq!(o.ops, ops);
        for i in [0, 9, b.len() / 2, b.len() - 1] {
            let mut bad = b.clone();
            bad[i] ^= 1;
            assert!(decode_object(&bad).is_err(), "flip at {i}");
        }
        assert!(decode_object(&b[..b.len() - 1]).is_err());
        let j = encode_ops(&[(b"k".to_vec(), Some(vec![1, 2])), (b"r".to_vec(), None)]);
        assert_eq!(
            decode_ops(&j).unwrap(),
            vec![(b"k".to_vec(), Some(vec![1, 2])), (b"r".to_vec(), None)]
        );
        assert!(decode_ops(&j[..j.len() - 1]).is_err());
        let mut newer = j.clone();
        newer[1] = 2;
        assert!(decode_ops(&newer).unwrap_err().contains("schema version 2"));
    }
}
