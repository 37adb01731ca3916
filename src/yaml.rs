//! YAML for operator files, through serde_yaml_ng (the maintained serde_yaml fork).
//!
//! * [`to_json`] turns a YAML document into a `serde_json::Value` for schema validation,
//!   refusing duplicate keys, non-string keys, tags and non-finite numbers. Alias expansion is
//!   bounded by serde_yaml_ng's repetition limit, so a "billion laughs" file fails fast.
//! * [`locate`] finds the line and column of a JSON-pointer path in the same text. It is used
//!   only when reporting an error, so the happy path pays nothing for positions.

#![forbid(unsafe_code)]

use serde::de::{self, Deserialize, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use std::fmt;

/// A YAML problem with its position (1-based line and column), when known.
#[derive(Debug)]
pub struct YamlError {
    pub message: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
}

impl YamlError {
    fn from_lib(e: serde_yaml_ng::Error) -> Self {
        let loc = e.location();
        let mut message = e.to_string();
        // serde_yaml_ng appends " at line L column C"; we print positions ourselves.
        if let Some(i) = message.find(" at line ") {
            message.truncate(i);
        }
        if message.contains("repetition limit exceeded")
            || message.contains("recursion limit exceeded")
        {
            message = format!(
                "{message}: anchors and aliases expand beyond the allowed size (a \"billion laughs\" document?)"
            );
        }
        YamlError {
            message,
            line: loc.as_ref().map(|l| l.line()),
            column: loc.as_ref().map(|l| l.column()),
        }
    }
}

/// Parse one YAML document into JSON, strictly.
pub fn to_json(text: &str) -> Result<Value, YamlError> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    StrictValue::deserialize(de)
        .map(|v| v.0)
        .map_err(YamlError::from_lib)
}

struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML scalar, sequence or mapping")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number that is not finite (.nan or .inf) is not allowed"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(StrictValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        // The duplicate check runs while the key is read, so the error carries its position.
        while let Some(key) = map.next_key_seed(NewKey(&out))? {
            let StrictValue(v) = map.next_value()?;
            out.insert(key.0, v);
        }
        Ok(Value::Object(out))
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _data: A) -> Result<Value, A::Error> {
        Err(de::Error::custom(
            "YAML tags (`!tag value`) are not allowed here",
        ))
    }
}

/// Reads a key that must be a plain string not yet present in the mapping. Errors are raised
/// inside the visitor, so the parser stamps them with the key's position.
struct NewKey<'a>(&'a Map<String, Value>);

struct KeyString(String);

impl<'de> DeserializeSeed<'de> for NewKey<'_> {
    type Value = KeyString;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<KeyString, D::Error> {
        d.deserialize_any(self)
    }
}

fn not_a_string<E: de::Error>(v: impl fmt::Display) -> E {
    E::custom(format!("mapping key `{v}` is not a string; quote it"))
}

impl Visitor<'_> for NewKey<'_> {
    type Value = KeyString;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyString, E> {
        if self.0.contains_key(v) {
            return Err(E::custom(format!("duplicate key `{}`", truncate(v, 64))));
        }
        Ok(KeyString(v.to_owned()))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<KeyString, E> {
        Err(not_a_string(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyString, E> {
        Err(not_a_string(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyString, E> {
        Err(not_a_string(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<KeyString, E> {
        Err(not_a_string(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<KeyString, E> {
        Err(E::custom("a mapping key is empty (null)"))
    }
}

pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

// ---------------------------------------------------------------------------------------------
// Locating a path: replay the document and stop at the target with a marker error, so that the
// YAML parser attaches the position of the node it was reading.

/// One step of a JSON pointer. A numeric step indexes a sequence, or names a key in a mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step(pub String);

/// Split a JSON pointer (`/capabilities/3/backing`) into steps.
pub fn pointer_steps(pointer: &str) -> Vec<Step> {
    pointer
        .split('/')
        .skip(1)
        .map(|s| Step(s.replace("~1", "/").replace("~0", "~")))
        .collect()
}

const MARKER: &str = "\u{1}aap-locate";

/// 1-based (line, column) of the node at `steps`; with `key` set, of that key inside the mapping
/// at `steps` instead. `None` when the path is not in the document.
pub fn locate(text: &str, steps: &[Step], key: Option<&str>) -> Option<(usize, usize)> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    match (Locate { steps, key }).deserialize(de) {
        Err(e) if e.to_string().contains(MARKER) => e.location().map(|l| (l.line(), l.column())),
        _ => None,
    }
}

struct Locate<'a> {
    steps: &'a [Step],
    key: Option<&'a str>,
}

impl<'de> DeserializeSeed<'de> for Locate<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! hit_scalar {
    ($($name:ident : $t:ty),*) => {$(
        fn $name<E: de::Error>(self, _v: $t) -> Result<(), E> { self.hit() }
    )*};
}

impl Locate<'_> {
    fn hit<E: de::Error>(&self) -> Result<(), E> {
        if self.steps.is_empty() && self.key.is_none() {
            Err(E::custom(MARKER))
        } else {
            Ok(())
        }
    }
}

impl<'de> Visitor<'de> for Locate<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }
    hit_scalar!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.hit()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.hit()
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.hit()?;
        let Some((first, rest)) = self.steps.split_first() else {
            return Ok(());
        };
        let Ok(want) = first.0.parse::<usize>() else {
            return Ok(());
        };
        let mut i = 0;
        loop {
            if i == want {
                return seq
                    .next_element_seed(Locate {
                        steps: rest,
                        key: self.key,
                    })
                    .map(|_| ());
            }
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.hit()?;
        let (target, rest, is_key) = match (self.steps.split_first(), self.key) {
            (Some((first, rest)), _) => (first.0.as_str(), rest, false),
            (None, Some(k)) => (k, &[][..], true),
            (None, None) => return Ok(()),
        };
        while let Some(matched) = map.next_key_seed(KeyProbe {
            target,
            fail_on_match: is_key,
        })? {
            if matched {
                return map.next_value_seed(Locate {
                    steps: rest,
                    key: self.key,
                });
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

/// Reads a key and says whether it is the target; fails with the marker (at the key's
/// position) when the key itself is what we are locating.
struct KeyProbe<'a> {
    target: &'a str,
    fail_on_match: bool,
}

impl<'de> DeserializeSeed<'de> for KeyProbe<'_> {
    type Value = bool;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyProbe<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        if v == self.target {
            if self.fail_on_match {
                return Err(E::custom(MARKER));
            }
            return Ok(true);
        }
        Ok(false)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_f64<E>(self, _v: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str =
        "a: 1\nlist:\n  - x: 1\n    y: [1, 2]\n  - x: 2\n    z: hello\nflow: {k: v}\n";

    #[test]
    fn converts() {
        let v = to_json(DOC).unwrap();
        assert_eq!(v["list"][1]["z"], "hello");
        assert_eq!(v["flow"]["k"], "v");
    }

    #[test]
    fn locates_nodes_and_keys() {
        assert_eq!(locate(DOC, &pointer_steps("/list/1/z"), None), Some((6, 8)));
        assert_eq!(
            locate(DOC, &pointer_steps("/list/1"), Some("z")),
            Some((6, 5))
        );
        assert_eq!(
            locate(DOC, &pointer_steps("/list/0/y/1"), None),
            Some((4, 12))
        );
        assert_eq!(locate(DOC, &pointer_steps("/flow/k"), None), Some((7, 11)));
        assert_eq!(locate(DOC, &pointer_steps("/list/1"), None), Some((5, 5)));
        assert_eq!(locate(DOC, &pointer_steps("/nope"), None), None);
        assert_eq!(locate(DOC, &pointer_steps("/list/9"), None), None);
    }

    #[test]
    fn refuses_duplicates_and_odd_keys() {
        let e = to_json("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert!(e.message.contains("duplicate key `a`"), "{}", e.message);
        assert_eq!(e.line, Some(3));
        assert!(
            to_json("1: x\n")
                .unwrap_err()
                .message
                .contains("not a string")
        );
        assert!(to_json("a: !custom 3\n").is_err());
        assert!(to_json("a: .nan\n").is_err());
    }

    #[test]
    fn bounds_alias_expansion() {
        let mut doc = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            doc.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let e = to_json(&doc).unwrap_err();
        assert!(e.message.contains("billion laughs"), "{}", e.message);
    }
}
