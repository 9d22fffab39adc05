//! Events an app records, their JSON Lines form, and their validation.
//!
//! # JSON Lines records
//! One JSON object per line; `"type"` says which record it is. Keys not listed here are
//! refused (a typo must not silently drop data). Timestamps are RFC 3339.
//!
//! | `type` | keys (optional in brackets) | kind of data |
//! |---|---|---|
//! | `item` | `item`, `topics` (array of strings), [`sensitive` (bool, default false)], [`published`], [`title`], [`format`], [`popularity` (number ≥ 0)] | catalogue (not personal) |
//! | `rating` | `item`, `value` (number in [1, 5]), `at` | feedback |
//! | `thumbs` | `item`, `value` (`"up"` or `"down"`), `at` | feedback |
//! | `save`, `dismiss` | `item`, `at` | feedback |
//! | `dwell` | `item`, `seconds` (finite, 0 ≤ s ≤ 86,400), `at` | feedback |
//! | `interest` | `topic`, [`at`] | explicit |
//! | `role`, `goal` | `value`, [`at`] | explicit |
//! | `consent` | `topic`, `personalise` (bool), [`at`] | sensitive-topic opt-in |
//!
//! Explicit records and consents without `at` are stamped with the time of ingestion.
//! A record is refused, naming the field, when a key is missing or of the wrong type, a
//! string is empty or longer than 256 bytes, a number is NaN, infinite or out of range,
//! or a timestamp lies more than [`EventLimits::future_tolerance_ms`] in the future.

use serde_json::{Map, Value, json};
use thiserror::Error;

use crate::time::Timestamp;

/// Longest accepted item id, topic, title or explicit value, in bytes.
pub const MAX_TEXT_BYTES: usize = 256;

/// Why one event was refused: the field at fault and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("field `{field}`: {message}")]
pub struct EventError {
    /// The JSON key (or `type`, or `line` for text that is not a JSON object).
    pub field: String,
    /// What is wrong, including the offending value.
    pub message: String,
}

impl EventError {
    fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// A catalogue entry: content the app can recommend. Not personal data.
#[derive(Clone, Debug, PartialEq)]
pub struct CatalogueItem {
    /// The app's id for the item.
    pub item: String,
    /// Topics, e.g. `["Comedy"]`; the first is the item's primary topic.
    pub topics: Vec<String>,
    /// Whether the item touches a sensitive topic (health, religion, …): it is then never
    /// used to personalise unless the user opted in for every one of its topics.
    pub sensitive: bool,
    /// When the item was published, for the recency floor.
    pub published: Option<Timestamp>,
    /// A human-readable title for transparency labels.
    pub title: Option<String>,
    /// The item's format (`video`, `article`, …), for the inferred profile.
    pub format: Option<String>,
    /// A non-personal popularity score from the app, for the cold-start ranking.
    pub popularity: Option<f64>,
}

/// One feedback signal on an item.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Signal {
    /// An explicit rating in [1, 5].
    Rating(f64),
    /// Thumbs up.
    ThumbsUp,
    /// Thumbs down.
    ThumbsDown,
    /// The user saved the item.
    Save,
    /// The user dismissed the item.
    Dismiss,
    /// Seconds the user spent on the item.
    Dwell(f64),
}

impl Signal {
    /// The record `type` (and the stored kind).
    pub fn kind(self) -> &'static str {
        match self {
            Self::Rating(_) => "rating",
            Self::ThumbsUp | Self::ThumbsDown => "thumbs",
            Self::Save => "save",
            Self::Dismiss => "dismiss",
            Self::Dwell(_) => "dwell",
        }
    }

    /// The stored number: the rating, 1/0 for thumbs up/down, the seconds, 0 otherwise.
    pub fn stored_value(self) -> f64 {
        match self {
            Self::Rating(v) | Self::Dwell(v) => v,
            Self::ThumbsUp => 1.0,
            Self::ThumbsDown | Self::Save | Self::Dismiss => 0.0,
        }
    }

    /// The signal back from its stored kind and value.
    pub fn from_stored(kind: &str, value: f64) -> Option<Self> {
        Some(match kind {
            "rating" => Self::Rating(value),
            "thumbs" if value > 0.5 => Self::ThumbsUp,
            "thumbs" => Self::ThumbsDown,
            "save" => Self::Save,
            "dismiss" => Self::Dismiss,
            "dwell" => Self::Dwell(value),
            _ => return None,
        })
    }
}

/// A feedback event: a signal on an item at a time.
#[derive(Clone, Debug, PartialEq)]
pub struct Feedback {
    /// The item's id.
    pub item: String,
    /// What the user did.
    pub signal: Signal,
    /// When.
    pub at: Timestamp,
}

/// The kinds of explicit data: what the user told the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExplicitKind {
    /// The user's role (one at a time; a new one replaces the old).
    Role,
    /// A goal (a set).
    Goal,
    /// A topic the user follows (a set).
    Interest,
}

impl ExplicitKind {
    /// The record `type` (and the stored kind).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Role => "role",
            Self::Goal => "goal",
            Self::Interest => "interest",
        }
    }

    /// The kind from its stored name.
    pub fn parse(kind: &str) -> Option<Self> {
        match kind {
            "role" => Some(Self::Role),
            "goal" => Some(Self::Goal),
            "interest" => Some(Self::Interest),
            _ => None,
        }
    }
}

/// One event, as an app records it or as one JSON Lines record carries it.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A catalogue entry.
    Item(CatalogueItem),
    /// A feedback signal.
    Feedback(Feedback),
    /// Explicit data: a role, a goal or an interest.
    Explicit {
        /// Which kind.
        kind: ExplicitKind,
        /// The role, goal or topic.
        value: String,
        /// When the user said it (ingestion time if absent).
        at: Option<Timestamp>,
    },
    /// The user's choice for a sensitive topic.
    Consent {
        /// The topic.
        topic: String,
        /// Whether items of this topic may be used to personalise.
        personalise: bool,
        /// When (ingestion time if absent).
        at: Option<Timestamp>,
    },
}

/// Limits that events are checked against.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EventLimits {
    /// How far in the future a timestamp may lie (clock skew), in milliseconds. Default 5 min.
    pub future_tolerance_ms: i64,
    /// The rating scale, inclusive. Default [1, 5].
    pub rating_range: (f64, f64),
    /// The longest dwell accepted, in seconds. Default 86,400 (one day).
    pub max_dwell_seconds: f64,
}

impl Default for EventLimits {
    fn default() -> Self {
        Self {
            future_tolerance_ms: 5 * 60 * 1000,
            rating_range: (1.0, 5.0),
            max_dwell_seconds: 86_400.0,
        }
    }
}

fn check_text(field: &str, value: &str) -> Result<(), EventError> {
    if value.trim().is_empty() {
        return Err(EventError::new(field, "must not be empty"));
    }
    if value.len() > MAX_TEXT_BYTES {
        return Err(EventError::new(
            field,
            format!("is {} bytes long; at most {MAX_TEXT_BYTES}", value.len()),
        ));
    }
    Ok(())
}

fn check_time(
    field: &str,
    at: Timestamp,
    now: Timestamp,
    limits: &EventLimits,
) -> Result<(), EventError> {
    if at > now.plus_millis(limits.future_tolerance_ms) {
        return Err(EventError::new(
            field,
            format!(
                "{at} is in the future (now is {now}; the tolerance is {} s)",
                limits.future_tolerance_ms / 1000
            ),
        ));
    }
    Ok(())
}

impl Event {
    /// The record's `type`.
    pub fn record_type(&self) -> &'static str {
        match self {
            Self::Item(_) => "item",
            Self::Feedback(f) => f.signal.kind(),
            Self::Explicit { kind, .. } => kind.as_str(),
            Self::Consent { .. } => "consent",
        }
    }

    /// Checks every field against `limits` at time `now`.
    pub fn validate(&self, now: Timestamp, limits: &EventLimits) -> Result<(), EventError> {
        match self {
            Self::Item(item) => {
                check_text("item", &item.item)?;
                for topic in &item.topics {
                    check_text("topics", topic)?;
                }
                if let Some(t) = item.published {
                    check_time("published", t, now, limits)?;
                }
                if let Some(title) = &item.title {
                    check_text("title", title)?;
                }
                if let Some(format) = &item.format {
                    check_text("format", format)?;
                }
                if let Some(p) = item.popularity
                    && !(p.is_finite() && p >= 0.0)
                {
                    return Err(EventError::new(
                        "popularity",
                        format!("must be a finite number ≥ 0, got {p}"),
                    ));
                }
            }
            Self::Feedback(f) => {
                check_text("item", &f.item)?;
                match f.signal {
                    Signal::Rating(v) => {
                        let (lo, hi) = limits.rating_range;
                        if !(v.is_finite() && (lo..=hi).contains(&v)) {
                            return Err(EventError::new(
                                "value",
                                format!("a rating must be a number in [{lo}, {hi}], got {v}"),
                            ));
                        }
                    }
                    Signal::Dwell(s)
                        if !(s.is_finite() && (0.0..=limits.max_dwell_seconds).contains(&s)) =>
                    {
                        return Err(EventError::new(
                            "seconds",
                            format!(
                                "must be a finite number of seconds in [0, {}], got {s}",
                                limits.max_dwell_seconds
                            ),
                        ));
                    }
                    _ => {}
                }
                check_time("at", f.at, now, limits)?;
            }
            Self::Explicit { kind, value, at } => {
                let field = if *kind == ExplicitKind::Interest {
                    "topic"
                } else {
                    "value"
                };
                check_text(field, value)?;
                if let Some(at) = at {
                    check_time("at", *at, now, limits)?;
                }
            }
            Self::Consent { topic, at, .. } => {
                check_text("topic", topic)?;
                if let Some(at) = at {
                    check_time("at", *at, now, limits)?;
                }
            }
        }
        Ok(())
    }

    /// Parses one JSON Lines record (structure and types only; see [`Event::validate`]).
    pub fn from_json_line(line: &str) -> Result<Self, EventError> {
        let value: Value = serde_json::from_str(line).map_err(|e| json_syntax_error(line, &e))?;
        let Value::Object(map) = value else {
            return Err(EventError::new("line", "must be a JSON object"));
        };
        Self::from_json_object(&map)
    }

    /// Parses one record from a JSON object.
    pub fn from_json_object(map: &Map<String, Value>) -> Result<Self, EventError> {
        let record = Record(map);
        let kind = record.string("type")?;
        let allowed: &[&str] = match kind.as_str() {
            "item" => &[
                "item",
                "topics",
                "sensitive",
                "published",
                "title",
                "format",
                "popularity",
            ],
            "rating" | "thumbs" => &["item", "value", "at"],
            "save" | "dismiss" => &["item", "at"],
            "dwell" => &["item", "seconds", "at"],
            "interest" => &["topic", "at"],
            "role" | "goal" => &["value", "at"],
            "consent" => &["topic", "personalise", "at"],
            other => {
                return Err(EventError::new(
                    "type",
                    format!(
                        "unknown record type '{other}' (expected item, rating, thumbs, save, \
                         dismiss, dwell, interest, role, goal or consent)"
                    ),
                ));
            }
        };
        if let Some(key) = map
            .keys()
            .find(|k| *k != "type" && !allowed.contains(&k.as_str()))
        {
            return Err(EventError::new(
                key,
                format!("is not a key of a '{kind}' record"),
            ));
        }
        let feedback = |signal| -> Result<Event, EventError> {
            Ok(Event::Feedback(Feedback {
                item: record.string("item")?,
                signal,
                at: record.time("at")?,
            }))
        };
        Ok(match kind.as_str() {
            "item" => Event::Item(CatalogueItem {
                item: record.string("item")?,
                topics: record.strings("topics")?,
                sensitive: record.optional_bool("sensitive")?.unwrap_or(false),
                published: record.optional_time("published")?,
                title: record.optional_string("title")?,
                format: record.optional_string("format")?,
                popularity: record.optional_number("popularity")?,
            }),
            "rating" => feedback(Signal::Rating(record.number("value")?))?,
            "thumbs" => match record.string("value")?.as_str() {
                "up" => feedback(Signal::ThumbsUp)?,
                "down" => feedback(Signal::ThumbsDown)?,
                other => {
                    return Err(EventError::new(
                        "value",
                        format!("thumbs must be \"up\" or \"down\", got \"{other}\""),
                    ));
                }
            },
            "save" => feedback(Signal::Save)?,
            "dismiss" => feedback(Signal::Dismiss)?,
            "dwell" => feedback(Signal::Dwell(record.number("seconds")?))?,
            "interest" => Event::Explicit {
                kind: ExplicitKind::Interest,
                value: record.string("topic")?,
                at: record.optional_time("at")?,
            },
            "role" | "goal" => Event::Explicit {
                kind: ExplicitKind::parse(&kind).expect("role or goal"),
                value: record.string("value")?,
                at: record.optional_time("at")?,
            },
            _ => Event::Consent {
                topic: record.string("topic")?,
                personalise: record.bool("personalise")?,
                at: record.optional_time("at")?,
            },
        })
    }

    /// The record as a JSON object, in the JSON Lines format (keys in documented order).
    pub fn to_json(&self) -> Value {
        let opt_time = |t: &Option<Timestamp>| t.map(|t| t.to_rfc3339());
        let mut value = match self {
            Self::Item(i) => {
                let mut v = json!({
                    "type": "item", "item": i.item, "topics": i.topics, "sensitive": i.sensitive,
                });
                let m = v.as_object_mut().expect("object");
                if let Some(p) = i.published {
                    m.insert("published".into(), p.to_rfc3339().into());
                }
                if let Some(t) = &i.title {
                    m.insert("title".into(), t.clone().into());
                }
                if let Some(f) = &i.format {
                    m.insert("format".into(), f.clone().into());
                }
                if let Some(p) = i.popularity {
                    m.insert("popularity".into(), p.into());
                }
                v
            }
            Self::Feedback(f) => {
                let at = f.at.to_rfc3339();
                match f.signal {
                    Signal::Rating(v) => {
                        json!({"type": "rating", "item": f.item, "value": v, "at": at})
                    }
                    Signal::ThumbsUp => {
                        json!({"type": "thumbs", "item": f.item, "value": "up", "at": at})
                    }
                    Signal::ThumbsDown => {
                        json!({"type": "thumbs", "item": f.item, "value": "down", "at": at})
                    }
                    Signal::Dwell(s) => {
                        json!({"type": "dwell", "item": f.item, "seconds": s, "at": at})
                    }
                    Signal::Save | Signal::Dismiss => {
                        json!({"type": f.signal.kind(), "item": f.item, "at": at})
                    }
                }
            }
            Self::Explicit { kind, value, at } => {
                let key = if *kind == ExplicitKind::Interest {
                    "topic"
                } else {
                    "value"
                };
                json!({"type": kind.as_str(), key: value, "at": opt_time(at)})
            }
            Self::Consent {
                topic,
                personalise,
                at,
            } => {
                json!({"type": "consent", "topic": topic, "personalise": personalise, "at": opt_time(at)})
            }
        };
        if let Some(m) = value.as_object_mut() {
            m.retain(|_, v| !v.is_null());
        }
        value
    }
}

/// A JSON syntax error, attributed to the key whose value it is in when that can be seen
/// (`"seconds": NaN` names `seconds`), else to `line`.
fn json_syntax_error(line: &str, e: &serde_json::Error) -> EventError {
    let upto: String = line.chars().take(e.column().saturating_sub(1)).collect();
    let field = upto.rfind(':').and_then(|colon| {
        let before = upto[..colon].trim_end();
        let key = before.strip_suffix('"')?;
        let start = key.rfind('"')?;
        let after = upto[colon + 1..].trim();
        // Only when the error is inside this key's value (no later key started).
        (!after.contains(',') && !after.contains('"')).then(|| key[start + 1..].to_owned())
    });
    EventError::new(
        field.as_deref().unwrap_or("line"),
        format!("not valid JSON: {e}"),
    )
}

struct Record<'a>(&'a Map<String, Value>);

impl Record<'_> {
    fn required(&self, key: &str) -> Result<&Value, EventError> {
        match self.0.get(key) {
            Some(Value::Null) | None => Err(EventError::new(key, "is missing")),
            Some(v) => Ok(v),
        }
    }
    fn string(&self, key: &str) -> Result<String, EventError> {
        match self.required(key)? {
            Value::String(s) => Ok(s.clone()),
            other => Err(EventError::new(
                key,
                format!("must be a string, got {other}"),
            )),
        }
    }
    fn optional_string(&self, key: &str) -> Result<Option<String>, EventError> {
        self.optional(key, Self::string)
    }
    fn strings(&self, key: &str) -> Result<Vec<String>, EventError> {
        match self.required(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(EventError::new(
                        key,
                        format!("must be an array of strings; {other} is not a string"),
                    )),
                })
                .collect(),
            other => Err(EventError::new(
                key,
                format!("must be an array of strings, got {other}"),
            )),
        }
    }
    fn number(&self, key: &str) -> Result<f64, EventError> {
        match self.required(key)? {
            Value::Number(n) => n
                .as_f64()
                .ok_or_else(|| EventError::new(key, "is not a representable number")),
            other => Err(EventError::new(
                key,
                format!("must be a number, got {other}"),
            )),
        }
    }
    fn optional_number(&self, key: &str) -> Result<Option<f64>, EventError> {
        self.optional(key, Self::number)
    }
    fn bool(&self, key: &str) -> Result<bool, EventError> {
        match self.required(key)? {
            Value::Bool(b) => Ok(*b),
            other => Err(EventError::new(
                key,
                format!("must be true or false, got {other}"),
            )),
        }
    }
    fn optional_bool(&self, key: &str) -> Result<Option<bool>, EventError> {
        self.optional(key, Self::bool)
    }
    fn time(&self, key: &str) -> Result<Timestamp, EventError> {
        let text = self.string(key)?;
        Timestamp::parse_rfc3339(&text).map_err(|m| EventError::new(key, m))
    }
    fn optional_time(&self, key: &str) -> Result<Option<Timestamp>, EventError> {
        self.optional(key, Self::time)
    }
    fn optional<T>(
        &self,
        key: &str,
        read: impl Fn(&Self, &str) -> Result<T, EventError>,
    ) -> Result<Option<T>, EventError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => read(self, key).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        Timestamp::parse_rfc3339("2026-06-01T00:00:00Z").unwrap()
    }

    fn field_of(line: &str) -> String {
        match Event::from_json_line(line) {
            Err(e) => e.field,
            Ok(event) => {
                event
                    .validate(now(), &EventLimits::default())
                    .unwrap_err()
                    .field
            }
        }
    }

    #[test]
    fn every_record_type_of_the_issue_parses_and_round_trips() {
        let lines = [
            r#"{"type":"item","item":"i42","topics":["Comedy"],"sensitive":false,"published":"2026-01-05T00:00:00Z"}"#,
            r#"{"type":"rating","item":"i42","value":4.0,"at":"2026-01-06T10:00:00Z"}"#,
            r#"{"type":"thumbs","item":"i42","value":"up","at":"2026-01-06T10:00:00Z"}"#,
            r#"{"type":"thumbs","item":"i42","value":"down","at":"2026-01-06T10:00:00Z"}"#,
            r#"{"type":"save","item":"i42","at":"2026-01-06T10:00:00Z"}"#,
            r#"{"type":"dismiss","item":"i42","at":"2026-01-06T10:00:00Z"}"#,
            r#"{"type":"dwell","item":"i42","seconds":31.5,"at":"2026-01-06T10:00:00Z"}"#,
            r#"{"type":"interest","topic":"Comedy"}"#,
            r#"{"type":"role","value":"student"}"#,
            r#"{"type":"goal","value":"learn Rust"}"#,
            r#"{"type":"consent","topic":"Health","personalise":true}"#,
        ];
        for line in lines {
            let event = Event::from_json_line(line).unwrap();
            event.validate(now(), &EventLimits::default()).unwrap();
            let back = Event::from_json_object(event.to_json().as_object().unwrap()).unwrap();
            assert_eq!(back, event, "{line}");
        }
    }

    #[test]
    fn bad_records_are_refused_naming_the_field() {
        let cases = [
            (r#"{"type":"like","item":"i1"}"#, "type"),
            (r#"{"item":"i1"}"#, "type"),
            (
                r#"{"type":"dwell","item":"i1","seconds":NaN,"at":"2026-01-06T10:00:00Z"}"#,
                "seconds",
            ),
            (
                r#"{"type":"dwell","item":"i1","seconds":"NaN","at":"2026-01-06T10:00:00Z"}"#,
                "seconds",
            ),
            (
                r#"{"type":"dwell","item":"i1","seconds":-3,"at":"2026-01-06T10:00:00Z"}"#,
                "seconds",
            ),
            (
                r#"{"type":"rating","item":"i1","value":7,"at":"2026-01-06T10:00:00Z"}"#,
                "value",
            ),
            (
                r#"{"type":"rating","item":"i1","value":4,"at":"2027-01-06T10:00:00Z"}"#,
                "at",
            ),
            (
                r#"{"type":"rating","item":"i1","value":4,"at":"yesterday"}"#,
                "at",
            ),
            (r#"{"type":"rating","item":"i1","value":4}"#, "at"),
            (
                r#"{"type":"thumbs","item":"i1","value":"sideways","at":"2026-01-06T10:00:00Z"}"#,
                "value",
            ),
            (
                r#"{"type":"save","item":"","at":"2026-01-06T10:00:00Z"}"#,
                "item",
            ),
            (
                r#"{"type":"save","item":"i1","at":"2026-01-06T10:00:00Z","rating":5}"#,
                "rating",
            ),
            (r#"{"type":"item","item":"i1","topics":"Comedy"}"#, "topics"),
            (
                r#"{"type":"item","item":"i1","topics":[],"published":"2030-01-01T00:00:00Z"}"#,
                "published",
            ),
            (
                r#"{"type":"item","item":"i1","topics":[],"popularity":-1}"#,
                "popularity",
            ),
            (
                r#"{"type":"consent","topic":"Health","personalise":"yes"}"#,
                "personalise",
            ),
            (r#"{"type":"interest","topic":"  "}"#, "topic"),
            (r#"[1,2]"#, "line"),
            (r#"{"type":"role","value":"x""#, "line"),
        ];
        for (line, field) in cases {
            assert_eq!(field_of(line), field, "{line}");
        }
    }

    #[test]
    fn a_nan_dwell_given_through_the_api_is_refused_naming_seconds() {
        let event = Event::Feedback(Feedback {
            item: "i1".into(),
            signal: Signal::Dwell(f64::NAN),
            at: now(),
        });
        let err = event.validate(now(), &EventLimits::default()).unwrap_err();
        assert_eq!(err.field, "seconds");
        assert!(err.to_string().contains("NaN"), "{err}");
    }
}
