//! Backend parameters, with credentials redacted wherever they are printed.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use serde::ser::SerializeMap;

const REDACTED: &str = "<redacted>";

/// Whether a parameter name carries a credential.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "secret",
        "access_key",
        "session_token",
        "connection_string",
        "password",
        "token",
        "sas",
    ]
    .iter()
    .any(|needle| key == *needle || key.contains(needle))
}

/// A credential of its own key (`pd_secret`): `Debug` prints `<redacted>`; only
/// [`Secret::expose`] gives the value.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The value, for handing to what needs it: never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Parameters handed to a NIXL plugin (`nixl_backend_params`, `backend_params`).
///
/// `Debug`, `Display` and `Serialize` print credentials (`secret_key`, `access_key`,
/// `session_token`, `connection_string`, …) as `<redacted>`; only [`BackendParams::expose`]
/// gives the real values, for the transport.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct BackendParams(BTreeMap<String, String>);

impl BackendParams {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of one parameter.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Sets one parameter.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.insert(key.into(), value.into());
    }

    /// Removes one parameter.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.0.remove(key)
    }

    /// Whether a parameter is set.
    pub fn contains(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// The real values, credentials included: for handing to NIXL, never for printing.
    pub fn expose(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    fn redacted(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| {
            let shown = if is_secret_key(k) {
                REDACTED
            } else {
                v.as_str()
            };
            (k.as_str(), shown)
        })
    }
}

impl From<BTreeMap<String, String>> for BackendParams {
    fn from(map: BTreeMap<String, String>) -> Self {
        Self(map)
    }
}

impl fmt::Debug for BackendParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.redacted()).finish()
    }
}

impl fmt::Display for BackendParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.redacted().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&parts.join(", "))
    }
}

impl Serialize for BackendParams {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.redacted() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// Turns a JSON/YAML scalar into the string NIXL expects; `None` for arrays, maps and null.
pub(crate) fn scalar_to_string(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> BackendParams {
        let mut p = BackendParams::new();
        p.insert("bucket", "kv");
        p.insert("access_key", "AKIAEXAMPLE");
        p.insert("secret_key", "wJalrXUtnFEMI");
        p.insert("session_token", "tok-123");
        p.insert(
            "connection_string",
            "DefaultEndpointsProtocol=http;AccountKey=Eby8vdM02x",
        );
        p
    }

    #[test]
    fn secrets_never_print() {
        let p = params();
        let printed = [
            format!("{p:?}"),
            format!("{p}"),
            serde_json::to_string(&p).unwrap(),
        ];
        for text in printed {
            for secret in ["AKIAEXAMPLE", "wJalrXUtnFEMI", "tok-123", "Eby8vdM02x"] {
                assert!(!text.contains(secret), "{secret} leaked in {text}");
            }
            assert!(
                text.contains("kv"),
                "non-secret values stay visible: {text}"
            );
        }
        assert_eq!(p.expose()["secret_key"], "wJalrXUtnFEMI");
    }
}
