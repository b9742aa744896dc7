//! JSON to msgpack (with field names, as the dispatcher expects) and msgpack back to JSON.

use anyhow::{anyhow, bail, Result};
use base64::Engine as _;
use bytes::Bytes;
use rmpv::Value as Mp;
use serde_json::{Map, Number, Value as Json};

/// Parses `text` as JSON, pointing at the position of the first error, and encodes it as
/// msgpack. `what` names the text in the error (`request`, `--metadata`).
pub fn to_msgpack(text: &str, what: &str) -> Result<Bytes> {
    let value = parse(text, what)?;
    encode(&value)
}

/// Parses JSON, with a one-line error that gives the line, the column and the text just
/// before the error.
pub fn parse(text: &str, what: &str) -> Result<Json> {
    serde_json::from_str(text).map_err(|e| {
        let line = text.lines().nth(e.line().saturating_sub(1)).unwrap_or("");
        let upto: String = line.chars().take(e.column()).collect();
        let skip = upto.chars().count().saturating_sub(24);
        let near: String = upto.chars().skip(skip).collect();
        anyhow!(
            "invalid JSON in {what} at line {}, column {} (at the end of {near:?}): {}",
            e.line(),
            e.column(),
            strip_position(&e.to_string())
        )
    })
}

/// serde_json appends " at line L column C" to its messages; we print the position ourselves.
fn strip_position(msg: &str) -> &str {
    msg.rfind(" at line ").map_or(msg, |i| &msg[..i])
}

/// Encodes a JSON value as msgpack: objects become maps with string keys.
pub fn encode(value: &Json) -> Result<Bytes> {
    Ok(rmp_serde::to_vec_named(value)?.into())
}

/// Decodes one msgpack value that must fill `bytes`, as JSON. An empty body is `null`.
///
/// Byte strings become base64 strings, map keys that are not strings become their JSON text,
/// extension values become `{"$ext": type, "data": base64}`.
pub fn from_msgpack(bytes: &[u8]) -> Result<Json> {
    if bytes.is_empty() {
        return Ok(Json::Null);
    }
    let mut rest = bytes;
    let value = rmpv::decode::read_value(&mut rest)
        .map_err(|e| anyhow!("the reply is not msgpack: {e}"))?;
    if !rest.is_empty() {
        bail!(
            "the reply has {} bytes after its msgpack value (use --raw to see them)",
            rest.len()
        );
    }
    Ok(to_json(value))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn to_json(value: Mp) -> Json {
    match value {
        Mp::Nil => Json::Null,
        Mp::Boolean(b) => Json::Bool(b),
        Mp::Integer(i) => match (i.as_u64(), i.as_i64()) {
            (Some(u), _) => Json::Number(u.into()),
            (None, Some(s)) => Json::Number(s.into()),
            _ => Json::Null,
        },
        Mp::F32(f) => float(f64::from(f)),
        Mp::F64(f) => float(f),
        Mp::String(s) => Json::String(match s.into_str() {
            Some(s) => s,
            None => "<invalid UTF-8>".to_string(),
        }),
        Mp::Binary(b) => Json::String(b64(&b)),
        Mp::Array(items) => Json::Array(items.into_iter().map(to_json).collect()),
        Mp::Map(entries) => {
            let mut map = Map::with_capacity(entries.len());
            for (k, v) in entries {
                let key = match k {
                    Mp::String(s) => s.into_str().unwrap_or_else(|| "<invalid UTF-8>".into()),
                    other => to_json(other).to_string(),
                };
                map.insert(key, to_json(v));
            }
            Json::Object(map)
        }
        Mp::Ext(ty, data) => {
            let mut map = Map::new();
            map.insert("$ext".into(), Json::Number(ty.into()));
            map.insert("data".into(), Json::String(b64(&data)));
            Json::Object(map)
        }
    }
}

/// JSON has no NaN or infinities: those print as strings.
fn float(f: f64) -> Json {
    Number::from_f64(f).map_or_else(|| Json::String(f.to_string()), Json::Number)
}

/// Lowercase hex, for `--raw`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_keep_field_names() {
        let bytes = to_msgpack(r#"{"a": 1, "b": [true, null, -2, 1.5, "x"]}"#, "request").unwrap();
        #[derive(serde::Deserialize, PartialEq, Debug)]
        struct T {
            a: u8,
            b: (bool, Option<u8>, i64, f64, String),
        }
        let t: T = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(t.a, 1);
        assert_eq!(t.b.4, "x");
        let back = from_msgpack(&bytes).unwrap();
        assert_eq!(
            back,
            parse(r#"{"a": 1, "b": [true, null, -2, 1.5, "x"]}"#, "x").unwrap()
        );
    }

    #[test]
    fn errors_point_at_the_position() {
        let err = to_msgpack("{\"a\": 1,\n \"b\": tru}", "request")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid JSON in request at line 2, column"),
            "{err}"
        );
        assert!(
            err.contains("(at the end of \" \\\"b\\\": tru}\")"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    #[test]
    fn msgpack_only_shapes_become_json() {
        let value = Mp::Map(vec![
            (Mp::from(7), Mp::Binary(vec![1, 2, 3])),
            (Mp::from("e"), Mp::Ext(5, vec![255])),
            (Mp::from("nan"), Mp::F64(f64::NAN)),
        ]);
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &value).unwrap();
        let json = from_msgpack(&buf).unwrap();
        assert_eq!(json["7"], "AQID");
        assert_eq!(json["e"]["$ext"], 5);
        assert_eq!(json["nan"], "NaN");
        assert_eq!(from_msgpack(&[]).unwrap(), Json::Null);
        assert!(from_msgpack(&[0xc0, 0xc0]).is_err());
        assert!(from_msgpack(&[0xd9]).is_err());
        assert_eq!(hex(&[0, 0xab]), "00ab");
    }
}
