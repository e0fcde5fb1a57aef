//! The wire walker: a cursor over protobuf bytes and a schema-driven, allocation-free check of
//! one message (recursing into nested messages), handing known fields to a visitor; and the
//! vocabulary of message layouts (`Ty`, `Field`, `Message`) that `schema` writes them in.

use super::{FieldPath, MAX_DEPTH, WireError};

/// Errors travel boxed inside the walker so results stay two words wide on the hot path.
pub(super) type Fail = Box<WireError>;

// The vocabulary message layouts are written in (`schema` holds the layouts themselves).

/// How a field is encoded and what is checked about it.
#[derive(Clone, Copy)]
pub(super) enum Ty {
    /// Varint (int32/int64/uint32/uint64/sint32/bool/enum).
    Varint,
    /// 64-bit (fixed64/sfixed64/double).
    Fixed64,
    /// 32-bit (fixed32/sfixed32/float).
    Fixed32,
    /// Length-delimited, valid UTF-8.
    Str,
    /// Length-delimited, any bytes.
    Bytes,
    /// Length-delimited id: empty or exactly this many bytes.
    Id(usize),
    /// Nested message, checked by `check::<ThatMessage>`.
    Msg(fn(&[u8], u32) -> Result<(), Fail>),
    /// Repeated 64-bit scalar, packed (length-delimited) or not.
    PackedFixed64,
    /// Repeated varint, packed (length-delimited) or not.
    PackedVarint,
    /// Nested message the caller walks itself (it gets the bytes unchecked).
    Custom,
}

/// One known field of a message.
#[derive(Clone, Copy)]
pub(super) struct Field {
    pub num: u32,
    pub name: &'static str,
    pub ty: Ty,
    pub repeated: bool,
}

/// A message layout.
pub(super) trait Message {
    /// The known field with this number. A `match` per message, so once inlined the walker's
    /// dispatch on the field's type folds away into direct code per field.
    fn field(number: u32) -> Option<Field>;
}

pub(super) const fn one(num: u32, name: &'static str, ty: Ty) -> Field {
    Field { num, name, ty, repeated: false }
}

pub(super) const fn many(num: u32, name: &'static str, ty: Ty) -> Field {
    Field { num, name, ty, repeated: true }
}

pub(super) const fn msg<M: Message>() -> Ty {
    Ty::Msg(check::<M>)
}

#[cold]
fn truncated(offset: usize) -> Fail {
    Box::new(WireError::Truncated { path: FieldPath::default(), offset })
}

/// A cursor over one message (`data`).
///
/// Offsets in errors are taken as addresses (`data.as_ptr() + pos`) while walking, so a
/// sub-message is just a slice and travels in registers; the public functions turn them into
/// offsets from the start of the request ([`relocate`]).
pub(super) struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    #[inline]
    pub(super) fn new(data: &'a [u8]) -> Reader<'a> {
        Reader { data, pos: 0 }
    }

    #[inline]
    pub(super) fn is_done(&self) -> bool {
        self.pos >= self.data.len()
    }

    /// Bytes not read yet.
    #[inline]
    pub(super) fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    /// Address of the next byte (see the type's docs).
    #[inline]
    fn offset(&self) -> usize {
        self.data.as_ptr() as usize + self.pos
    }

    #[inline]
    pub(super) fn varint(&mut self) -> Result<u64, Fail> {
        match self.data.get(self.pos) {
            Some(&byte) if byte < 0x80 => {
                self.pos += 1;
                Ok(u64::from(byte))
            }
            _ => self.varint_slow(),
        }
    }

    #[inline(never)]
    fn varint_slow(&mut self) -> Result<u64, Fail> {
        let start = self.offset();
        let mut value = 0u64;
        for shift in 0..10u32 {
            let Some(&byte) = self.data.get(self.pos) else { return Err(truncated(start)) };
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << (7 * shift);
            if byte < 0x80 {
                // The tenth byte may only carry the top bit of a u64.
                if shift == 9 && byte > 1 {
                    break;
                }
                return Ok(value);
            }
        }
        Err(WireError::Varint { path: FieldPath::default(), offset: start }.into())
    }

    #[inline]
    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], Fail> {
        match self.data.get(self.pos..).and_then(<[u8]>::first_chunk::<N>) {
            Some(value) => {
                self.pos += N;
                Ok(*value)
            }
            None => Err(truncated(self.offset())),
        }
    }

    /// Reads a length prefix and returns the bytes it covers; `at` is the field's key.
    #[inline]
    pub(super) fn len_delimited(&mut self, at: usize) -> Result<&'a [u8], Fail> {
        let len = self.varint()?;
        let start = self.pos;
        let data = usize::try_from(len)
            .ok()
            .and_then(|len| self.data.get(start..start.checked_add(len)?))
            .ok_or_else(|| truncated(at))?;
        self.pos = start + data.len();
        Ok(data)
    }

    /// Reads a field key: (field number, wire type, offset of the key).
    #[inline]
    pub(super) fn key(&mut self) -> Result<(u32, u8, usize), Fail> {
        let at = self.offset();
        let key = self.varint()?;
        let wire_type = (key & 7) as u8;
        if matches!(wire_type, 0 | 1 | 2 | 5) && key >= 8 && key <= u64::from(u32::MAX) {
            Ok(((key >> 3) as u32, wire_type, at))
        } else {
            Err(bad_key(key, at))
        }
    }

    /// Skips the value of an unknown field (the key's wire type is already checked).
    #[inline]
    pub(super) fn skip(&mut self, wire_type: u8, at: usize) -> Result<(), Fail> {
        match wire_type {
            0 => self.varint().map(drop),
            1 => self.fixed::<8>().map(drop),
            5 => self.fixed::<4>().map(drop),
            _ => self.len_delimited(at).map(drop),
        }
    }
}

#[cold]
fn bad_key(key: u64, at: usize) -> Fail {
    let path = FieldPath::default();
    let wire_type = (key & 7) as u8;
    Box::new(if key < 8 || key > u64::from(u32::MAX) {
        WireError::InvalidKey { path, offset: at }
    } else if matches!(wire_type, 3 | 4) {
        WireError::Group { path, wire_type, offset: at }
    } else {
        WireError::InvalidWireType { path, wire_type, offset: at }
    })
}

/// Turns an internal error (offsets as addresses) into the public one (offsets in `request`).
#[cold]
pub(super) fn relocate(mut err: WireError, request: &[u8]) -> WireError {
    if let WireError::Truncated { offset, .. }
    | WireError::Varint { offset, .. }
    | WireError::InvalidKey { offset, .. }
    | WireError::InvalidWireType { offset, .. }
    | WireError::Group { offset, .. }
    | WireError::WireTypeMismatch { offset, .. } = &mut err
    {
        *offset = offset.wrapping_sub(request.as_ptr() as usize);
    }
    err
}

/// A known field's value as handed to a walk callback (after its checks passed).
#[derive(Clone, Copy)]
pub(super) enum Val<'a> {
    /// Varint or fixed-width scalar.
    Int(u64),
    /// UTF-8 checked string, as bytes (most are only checked; `text` reads one).
    Str(&'a [u8]),
    /// Bytes, an id, a checked nested message, or a `Custom` message to walk.
    Bytes(&'a [u8]),
}

/// Walks one message of layout `M`, checking every known field (nested `Msg` fields
/// recursively) and skipping unknown ones; `visit` sees each known field. Errors carry the path
/// of the field they occurred in.
#[inline(always)]
pub(super) fn walk<'a, M: Message, F>(message: &'a [u8], depth: u32, visit: &mut F) -> Result<(), Fail>
where
    F: FnMut(u32, Val<'a>) -> Result<(), Fail>,
{
    if depth > MAX_DEPTH {
        return Err(WireError::TooDeep { path: FieldPath::default() }.into());
    }
    let mut r = Reader::new(message);
    while !r.is_done() {
        let (number, wire_type, at) = r.key()?;
        let Some(field) = M::field(number) else {
            r.skip(wire_type, at)?;
            continue;
        };
        if let Err(err) = read_field(&mut r, &field, wire_type, at, depth, visit) {
            let index = field.repeated.then(|| occurrences_before(message, number, at));
            return Err(err.within(field.name, index));
        }
    }
    Ok(())
}

/// How often field `number` occurs in `message` before `at` (for error paths; the message is
/// well formed up to there).
#[cold]
fn occurrences_before(message: &[u8], number: u32, at: usize) -> u32 {
    let mut r = Reader::new(message);
    let mut count = 0;
    while r.offset() < at {
        let Ok((n, wire_type, key_at)) = r.key() else { break };
        if n == number {
            count += 1;
        }
        if r.skip(wire_type, key_at).is_err() {
            break;
        }
    }
    count
}

/// Checks a message without looking at its values.
pub(super) fn check<M: Message>(message: &[u8], depth: u32) -> Result<(), Fail> {
    walk::<M, _>(message, depth, &mut |_, _| Ok(()))
}

#[inline(always)]
fn read_field<'a, F>(
    r: &mut Reader<'a>,
    field: &Field,
    wire_type: u8,
    at: usize,
    depth: u32,
    visit: &mut F,
) -> Result<(), Fail>
where
    F: FnMut(u32, Val<'a>) -> Result<(), Fail>,
{
    let expect = |wanted: u8, expected: &'static str| -> Result<(), Fail> {
        if wire_type == wanted {
            Ok(())
        } else {
            Err(WireError::WireTypeMismatch { path: FieldPath::default(), wire_type, expected, offset: at }.into())
        }
    };
    let value = match field.ty {
        Ty::Varint => {
            expect(0, "varint")?;
            Val::Int(r.varint()?)
        }
        Ty::Fixed64 => {
            expect(1, "64-bit")?;
            Val::Int(u64::from_le_bytes(r.fixed::<8>()?))
        }
        Ty::Fixed32 => {
            expect(5, "32-bit")?;
            Val::Int(u64::from(u32::from_le_bytes(r.fixed::<4>()?)))
        }
        Ty::Str => {
            expect(2, "length-delimited")?;
            let s = r.len_delimited(at)?;
            if !s.is_ascii() && std::str::from_utf8(s).is_err() {
                return Err(WireError::Utf8 { path: FieldPath::default() }.into());
            }
            Val::Str(s)
        }
        Ty::Bytes | Ty::Custom => {
            expect(2, "length-delimited")?;
            Val::Bytes(r.len_delimited(at)?)
        }
        Ty::Id(len) => {
            expect(2, "length-delimited")?;
            let id = r.len_delimited(at)?;
            if !id.is_empty() && id.len() != len {
                let expected = if len == 16 { "empty or 16 bytes" } else { "empty or 8 bytes" };
                return Err(WireError::IdLength { path: FieldPath::default(), expected, got: id.len() }.into());
            }
            Val::Bytes(id)
        }
        Ty::Msg(check) => {
            expect(2, "length-delimited")?;
            let message = r.len_delimited(at)?;
            check(message, depth + 1)?;
            Val::Bytes(message)
        }
        Ty::PackedFixed64 => {
            match wire_type {
                1 => drop(r.fixed::<8>()?),
                2 => {
                    let len = r.len_delimited(at)?.len();
                    if len % 8 != 0 {
                        return Err(WireError::PackedLength { path: FieldPath::default(), len }.into());
                    }
                }
                _ => expect(2, "64-bit or packed")?,
            }
            return Ok(());
        }
        Ty::PackedVarint => {
            match wire_type {
                0 => drop(r.varint()?),
                2 => {
                    let mut packed = Reader::new(r.len_delimited(at)?);
                    while !packed.is_done() {
                        packed.varint()?;
                    }
                }
                _ => expect(2, "varint or packed")?,
            }
            return Ok(());
        }
    };
    visit(field.num, value)
}
