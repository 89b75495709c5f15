//! Postcard decoding with string bounds checked on the length prefix.
//!
//! postcard reads a string as a varint length and then that many bytes. A plain decode of an
//! over-long string fails either in the bounded string's visitor (a generic custom error) or,
//! when the payload is truncated, as "unexpected end": neither says `too_large` nor which field.
//! [`BoundedStrings`] wraps postcard's slice flavor and checks every length before the bytes are
//! taken, against a table of the message's string fields in wire order.

use postcard::de_flavors::{Flavor, Slice};
use serde::Deserialize;

use crate::error::DecodeError;
use crate::message::{ErrorReply, Feedback, FinalReply, Reply, ReplyChunk, Request, RequestId};
use crate::{
    MAX_CHUNK_BYTES, MAX_ID_BYTES, MAX_MESSAGE_BYTES, MAX_NAME_BYTES, MAX_PROMPT_BYTES,
    PROTOCOL_VERSION,
};

/// A string field of a message: its name and bound.
#[derive(Debug)]
pub(crate) struct StringField {
    name: &'static str,
    max: usize,
}

const ID: StringField = StringField {
    name: "id",
    max: MAX_ID_BYTES,
};
const EXPERT: StringField = StringField {
    name: "expert",
    max: MAX_NAME_BYTES,
};

// The string fields of each message, in declaration (= wire) order. A unit test per message
// checks these tables against the structs (each string over its bound reports its own name).
const REQUEST_STRINGS: &[StringField] = &[
    ID,
    StringField {
        name: "prompt",
        max: MAX_PROMPT_BYTES,
    },
];
const CHUNK_STRINGS: &[StringField] = &[
    ID,
    StringField {
        name: "text",
        max: MAX_CHUNK_BYTES,
    },
    EXPERT,
];
const FINAL_STRINGS: &[StringField] = &[ID, EXPERT];
const ERROR_STRINGS: &[StringField] = &[
    ID,
    StringField {
        name: "message",
        max: MAX_MESSAGE_BYTES,
    },
];
const FEEDBACK_STRINGS: &[StringField] = &[ID];

/// postcard's slice flavor, plus a bound check of the n-th string against `fields[n]`.
///
/// postcard takes borrowed bytes (`try_take_n`) only for `str` and byte slices, and our
/// messages have no byte slices, so the n-th `try_take_n` is the n-th string. Floats use
/// `try_take_n_temp`, which is not counted.
struct BoundedStrings<'de> {
    inner: Slice<'de>,
    fields: &'static [StringField],
    next: usize,
    too_large: Option<&'static StringField>,
}

/// What is left after decoding: the unused input and the string that was over its bound.
struct Leftover<'de> {
    rest: &'de [u8],
    too_large: Option<&'static StringField>,
}

impl<'de> Flavor<'de> for BoundedStrings<'de> {
    type Remainder = Leftover<'de>;
    type Source = &'de [u8];

    fn pop(&mut self) -> postcard::Result<u8> {
        self.inner.pop()
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }

    fn try_take_n(&mut self, ct: usize) -> postcard::Result<&'de [u8]> {
        if let Some(field) = self.fields.get(self.next) {
            self.next += 1;
            if ct > field.max {
                self.too_large = Some(field);
                // Any error stops the decode; `decode_prefix` reports `too_large` instead.
                return Err(postcard::Error::DeserializeUnexpectedEnd);
            }
        }
        self.inner.try_take_n(ct)
    }

    fn try_take_n_temp<'a>(&'a mut self, ct: usize) -> postcard::Result<&'a [u8]>
    where
        'de: 'a,
    {
        self.inner.try_take_n_temp(ct)
    }

    fn finalize(self) -> postcard::Result<Leftover<'de>> {
        Ok(Leftover {
            rest: self.inner.finalize()?,
            too_large: self.too_large,
        })
    }
}

/// Decodes a `T` from the front of `bytes`; returns it and the unused rest.
/// `custom` is what a serde custom error means for `T` (an unknown enum index).
fn decode_prefix<'de, T: Deserialize<'de>>(
    bytes: &'de [u8],
    fields: &'static [StringField],
    custom: DecodeError,
) -> Result<(T, &'de [u8]), DecodeError> {
    let mut de = postcard::Deserializer::from_flavor(BoundedStrings {
        inner: Slice::new(bytes),
        fields,
        next: 0,
        too_large: None,
    });
    let value = T::deserialize(&mut de);
    let leftover = de.finalize();
    if let Ok(Leftover {
        too_large: Some(field),
        ..
    }) = leftover
    {
        return Err(DecodeError::FieldTooLarge {
            field: field.name,
            max: field.max,
        });
    }
    let value = value.map_err(|e| map_error(&e, custom))?;
    let rest = leftover.map_err(|e| map_error(&e, custom))?.rest;
    Ok((value, rest))
}

/// Decodes exactly one `T` (no trailing bytes).
fn decode_all<'de, T: Deserialize<'de>>(
    bytes: &'de [u8],
    fields: &'static [StringField],
    custom: DecodeError,
) -> Result<T, DecodeError> {
    let (value, rest) = decode_prefix(bytes, fields, custom)?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(DecodeError::malformed("bytes after the end of the message"))
    }
}

fn map_error(error: &postcard::Error, custom: DecodeError) -> DecodeError {
    use postcard::Error as E;
    match error {
        E::DeserializeUnexpectedEnd => DecodeError::malformed("message ends early"),
        E::DeserializeBadVarint => DecodeError::malformed("bad varint"),
        E::DeserializeBadBool => DecodeError::malformed("a bool that is neither 0 nor 1"),
        E::DeserializeBadUtf8 | E::DeserializeBadChar => {
            DecodeError::malformed("a string that is not UTF-8")
        }
        E::DeserializeBadOption => DecodeError::malformed("an option tag that is neither 0 nor 1"),
        E::DeserializeBadEnum | E::SerdeDeCustom => custom,
        _ => DecodeError::malformed("not a postcard message"),
    }
}

/// The `v` byte every request, feedback and reply body starts with.
fn check_version(body: &[u8]) -> Result<(), DecodeError> {
    match body.first() {
        None => Err(DecodeError::malformed("empty payload")),
        Some(&v) if v != PROTOCOL_VERSION => Err(DecodeError::UnsupportedVersion {
            found: u64::from(v),
        }),
        Some(_) => Ok(()),
    }
}

const NOT_CUSTOM: DecodeError = DecodeError::malformed("invalid value");

pub(crate) fn decode_request(bytes: &[u8]) -> Result<Request, DecodeError> {
    check_version(bytes)?;
    decode_all(
        bytes,
        REQUEST_STRINGS,
        DecodeError::invalid("task", "unknown task index"),
    )
}

pub(crate) fn decode_feedback(bytes: &[u8]) -> Result<Feedback, DecodeError> {
    check_version(bytes)?;
    decode_all(bytes, FEEDBACK_STRINGS, NOT_CUSTOM)
}

pub(crate) fn decode_reply(bytes: &[u8]) -> Result<Reply, DecodeError> {
    let (index, body) = postcard::take_from_bytes::<u32>(bytes)
        .map_err(|e| map_error(&e, DecodeError::malformed("bad reply type")))?;
    check_version(body)?;
    Ok(match index {
        0 => Reply::Chunk(decode_all::<ReplyChunk>(body, CHUNK_STRINGS, NOT_CUSTOM)?),
        1 => Reply::Final(decode_all::<FinalReply>(body, FINAL_STRINGS, NOT_CUSTOM)?),
        2 => Reply::Error(decode_all::<ErrorReply>(
            body,
            ERROR_STRINGS,
            DecodeError::invalid("code", "unknown error code"),
        )?),
        _ => return Err(DecodeError::invalid("type", "unknown reply type")),
    })
}

/// The id of a request or feedback: the `(v, id)` prefix, whatever follows.
pub(crate) fn peek_id(bytes: &[u8]) -> Option<RequestId> {
    decode_prefix::<(u8, RequestId)>(bytes, &[ID], NOT_CUSTOM)
        .ok()
        .map(|((_, id), _)| id)
}
