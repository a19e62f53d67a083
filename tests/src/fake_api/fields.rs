//! Field paths of JSON objects: the unit of server-side apply ownership in the fake server.
//! Maps are walked key by key; lists and scalars are leaves (the real server also merges some
//! lists by key, such as containers; here every list is atomic).

use std::collections::BTreeSet;

use serde_json::{Map, Value};

pub type Path = Vec<String>;
pub type FieldSet = BTreeSet<Path>;

/// Paths the server owns; no manager ever owns or conflicts on them.
fn is_system_path(path: &[String]) -> bool {
    match path {
        [top] => top == "apiVersion" || top == "kind",
        [meta, field, ..] if meta == "metadata" => matches!(
            field.as_str(),
            "name"
                | "namespace"
                | "uid"
                | "resourceVersion"
                | "generation"
                | "creationTimestamp"
                | "deletionTimestamp"
                | "deletionGracePeriodSeconds"
                | "managedFields"
                | "selfLink"
        ),
        _ => false,
    }
}

/// The leaf paths a manager claims by sending `config`. An empty map claims nothing: applying
/// `data: {}` merges no keys, so it must neither own nor conflict over the keys others set.
pub fn owned_by(config: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    collect_leaves(config, &mut Vec::new(), &mut out);
    out.retain(|path| !is_system_path(path));
    out
}

fn collect_leaves(value: &Value, prefix: &mut Path, out: &mut FieldSet) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                prefix.push(key.clone());
                collect_leaves(child, prefix, out);
                prefix.pop();
            }
        }
        _ if !prefix.is_empty() => {
            out.insert(prefix.clone());
        }
        _ => {}
    }
}

pub fn get<'v>(value: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(value, |current, key| current.get(key))
}

pub fn remove(value: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut current = value;
    for key in parents {
        match current.get_mut(key) {
            Some(child) => current = child,
            None => return,
        }
    }
    if let Some(map) = current.as_object_mut() {
        map.remove(last);
    }
}

/// Whether one path lies on the other (equal, or one an ancestor of the other).
pub fn overlaps(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// Leaves whose value differs between `old` and `new`, on either side.
pub fn changed(old: &Value, new: &Value) -> FieldSet {
    let before = owned_by(old);
    let after = owned_by(new);
    before
        .union(&after)
        .filter(|path| get(old, path) != get(new, path))
        .cloned()
        .collect()
}

/// Merges `patch` into `target` key by key: maps merge, everything else replaces, null removes.
pub fn merge(target: &mut Value, patch: &Value) {
    let (Value::Object(target_map), Value::Object(patch_map)) = (&mut *target, patch) else {
        *target = patch.clone();
        return;
    };
    for (key, value) in patch_map {
        if value.is_null() {
            target_map.remove(key);
        } else if let Some(existing) = target_map.get_mut(key).filter(|_| value.is_object()) {
            merge(existing, value);
        } else {
            target_map.insert(key.clone(), value.clone());
        }
    }
}

/// The `fieldsV1` rendering of a set: `{"f:metadata":{"f:labels":{"f:app":{}}}}`.
pub fn fields_v1(fields: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in fields {
        let mut node = &mut root;
        for key in path {
            let entry = node
                .entry(format!("f:{key}"))
                .or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(child) = entry else {
                break;
            };
            node = child;
        }
    }
    Value::Object(root)
}

pub fn render(path: &[String]) -> String {
    path.iter().map(|key| format!(".{key}")).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn path(p: &str) -> Path {
        p.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn ownership_leaves_out_identity() {
        let config = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "x", "labels": {"a": "1"}}, "data": {"k": "v"}, "list": [1]});
        let owned = owned_by(&config);
        let expected: FieldSet = [path("metadata.labels.a"), path("data.k"), path("list")].into();
        assert_eq!(owned, expected);
        assert_eq!(
            fields_v1(&owned),
            json!({"f:metadata": {"f:labels": {"f:a": {}}}, "f:data": {"f:k": {}}, "f:list": {}})
        );
    }

    #[test]
    fn changes_and_merges() {
        let mut object = json!({"data": {"a": "1", "b": "2"}});
        merge(&mut object, &json!({"data": {"b": null, "c": "3"}}));
        assert_eq!(object, json!({"data": {"a": "1", "c": "3"}}));
        let changed = changed(&json!({"data": {"a": "1", "b": "2"}}), &object);
        assert_eq!(changed, [path("data.b"), path("data.c")].into());
        remove(&mut object, &path("data.a"));
        assert_eq!(object, json!({"data": {"c": "3"}}));
        assert!(overlaps(&path("data"), &path("data.c")));
        assert!(!overlaps(&path("data.a"), &path("data.c")));
    }
}
