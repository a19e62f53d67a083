//! Label and field selectors, parsed as the real API server accepts them.

use serde_json::Value;

#[derive(Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Debug, Default)]
pub struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for term in split_terms(text)? {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            requirements.push(parse_requirement(term)?);
        }
        Ok(Self(requirements))
    }

    pub fn matches(&self, labels: Option<&serde_json::Map<String, Value>>) -> bool {
        let get = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.0.iter().all(|requirement| match requirement {
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        })
    }
}

/// Splits on commas outside parentheses.
fn split_terms(text: &str) -> Result<Vec<&str>, String> {
    let mut terms = Vec::new();
    let mut depth = 0_i32;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(format!("unbalanced parentheses in {text:?}"));
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced parentheses in {text:?}"));
    }
    terms.push(&text[start..]);
    Ok(terms)
}

fn parse_requirement(term: &str) -> Result<Requirement, String> {
    let set_op = |op: &str| -> Option<(String, Vec<String>)> {
        let (key, rest) = term.split_once(op)?;
        let values = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
        let values = values.split(',').map(|v| v.trim().to_owned()).collect();
        Some((key.trim().to_owned(), values))
    };
    if let Some((key, values)) = set_op(" notin ") {
        return Ok(Requirement::NotIn(key, values));
    }
    if let Some((key, values)) = set_op(" in ") {
        return Ok(Requirement::In(key, values));
    }
    if let Some((key, value)) = term.split_once("!=") {
        return Ok(Requirement::NotEquals(
            key.trim().into(),
            value.trim().into(),
        ));
    }
    if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(Requirement::Equals(key.trim().into(), value.trim().into()));
    }
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement::NotExists(key.trim().into()));
    }
    if term.contains(|c: char| c.is_whitespace() || "()<>".contains(c)) {
        return Err(format!("unable to parse requirement {term:?}"));
    }
    Ok(Requirement::Exists(term.to_owned()))
}

/// A field selector: `path=value`, `path==value` or `path!=value` terms over any dotted path of
/// the object (the real server allows only a few paths per kind; this one is more lenient).
#[derive(Debug, Default)]
pub struct FieldSelector(Vec<(Vec<String>, bool, String)>);

impl FieldSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (path, equal, value) = if let Some((p, v)) = term.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (p, true, v)
            } else {
                return Err(format!("invalid field selector term {term:?}"));
            };
            let path = path.trim().split('.').map(str::to_owned).collect();
            terms.push((path, equal, value.trim().to_owned()));
        }
        Ok(Self(terms))
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(path, equal, value)| {
            let mut current = object;
            for segment in path {
                current = current.get(segment).unwrap_or(&Value::Null);
            }
            let actual = match current {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (actual == *value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn label_selectors() {
        let labels = json!({"app": "paperless", "tier": "web"});
        let labels = labels.as_object();
        let matches = |s: &str| LabelSelector::parse(s).unwrap().matches(labels);
        assert!(matches("app=paperless"));
        assert!(matches("app==paperless,tier"));
        assert!(matches("app in (paperless, immich),!missing"));
        assert!(matches("tier notin (db)"));
        assert!(!matches("app!=paperless"));
        assert!(!matches("missing"));
        assert!(!matches("tier in (db)"));
        assert!(matches(""));
        assert!(LabelSelector::parse("app in (a").is_err());
    }

    #[test]
    fn field_selectors() {
        let object = json!({"metadata": {"name": "x", "namespace": "ns"}, "type": "Opaque"});
        let matches = |s: &str| FieldSelector::parse(s).unwrap().matches(&object);
        assert!(matches("metadata.name=x"));
        assert!(matches("metadata.namespace==ns,type=Opaque"));
        assert!(matches("metadata.name!=y"));
        assert!(!matches("metadata.name=y"));
        assert!(FieldSelector::parse("nonsense").is_err());
    }
}
