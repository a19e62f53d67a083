//! Validate: what a namespace's annotations ask of db-provisioner, as typed values. Pure.

use std::collections::BTreeMap;

use hearth_runtime::annotations::{
    self, AnnotationError, DeletionPolicy, ExtensionName, PgName, Profile, RedisRequest, keep_valid,
};

/// What one opted-in namespace wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub namespace: String,
    pub postgres: Option<PgName>,
    /// Extensions both asked for and allowed by the operator.
    pub extensions: Vec<ExtensionName>,
    pub redis: Option<RedisRequest>,
    pub profile: Profile,
    pub deletion_policy: DeletionPolicy,
    pub adopt: bool,
    pub rotate: Option<String>,
}

impl Desired {
    pub fn opted_in(&self) -> bool {
        self.postgres.is_some() || self.redis.is_some()
    }

    /// The Redis ACL user: the namespace name, which is already a safe token.
    pub fn redis_user(&self) -> &str {
        &self.namespace
    }
}

/// The outcome of reading a namespace: what it wants, plus every problem found. Any problem
/// with an annotation that drives provisioning stops the whole namespace (nothing half-done);
/// refused extensions are only skipped.
#[derive(Debug)]
pub struct Reading {
    pub desired: Desired,
    pub invalid: Vec<AnnotationError>,
    pub refused_extensions: Vec<String>,
    /// Redis was asked for but cannot serve this profile's app, so none is provisioned.
    pub redis_refused: bool,
}

pub fn read(
    namespace: &str,
    annotations: &BTreeMap<String, String>,
    allowed_extensions: &[String],
) -> Reading {
    let mut invalid = Vec::new();
    let get = |key: &str| annotations.get(key).map(String::as_str);

    let postgres = get(annotations::POSTGRES)
        .and_then(|v| keep_valid(&mut invalid, annotations::parse_postgres(v, namespace)))
        .flatten();
    let mut extensions = get(annotations::POSTGRES_EXTENSIONS)
        .and_then(|v| keep_valid(&mut invalid, annotations::parse_postgres_extensions(v)))
        .unwrap_or_default();
    let mut redis = get(annotations::REDIS)
        .and_then(|v| keep_valid(&mut invalid, annotations::parse_redis(v)))
        .flatten();
    let profile = get(annotations::PROFILE)
        .and_then(|v| keep_valid(&mut invalid, annotations::parse_profile(v)))
        .unwrap_or_default();
    // wallabag 2.6 sends Redis only a password, which Redis takes as a login of the `default`
    // user: an ACL user of its own could never be used, so none is made.
    let redis_refused = profile == Profile::Wallabag && redis.take().is_some();
    let deletion_policy = get(annotations::DELETION_POLICY)
        .and_then(|v| keep_valid(&mut invalid, annotations::parse_deletion_policy(v)))
        .unwrap_or_default();
    let adopt = get(annotations::ADOPT)
        .and_then(|v| keep_valid(&mut invalid, annotations::parse_flag(annotations::ADOPT, v)))
        .unwrap_or(false);
    let rotate = get(annotations::ROTATE)
        .and_then(|v| keep_valid(&mut invalid, annotations::parse_rotate(v)));

    let refused_extensions = extensions
        .iter()
        .filter(|e| !allowed_extensions.iter().any(|a| a == e.as_str()))
        .map(|e| e.as_str().to_owned())
        .collect();
    extensions.retain(|e| allowed_extensions.iter().any(|a| a == e.as_str()));

    Reading {
        desired: Desired {
            namespace: namespace.to_owned(),
            postgres,
            extensions,
            redis,
            profile,
            deletion_policy,
            adopt,
            rotate,
        },
        invalid,
        refused_extensions,
        redis_refused,
    }
}

#[cfg(test)]
mod tests {
    use hearth_tests::annotations;

    use super::*;

    #[test]
    fn a_paperless_namespace() {
        let reading = read(
            "paper-less",
            &annotations(&[
                ("hearth.dev/postgres", "true"),
                ("hearth.dev/postgres-extensions", "pg_trgm, vector"),
                ("hearth.dev/redis", "1"),
                ("hearth.dev/profile", "paperless"),
                ("hearth.dev/deletion-policy", "drop"),
                ("hearth.dev/rotate", "2026-11"),
            ]),
            &["pg_trgm".to_owned()],
        );
        assert!(reading.invalid.is_empty());
        let desired = reading.desired;
        assert_eq!(desired.postgres.unwrap().as_str(), "paper_less");
        assert_eq!(desired.extensions.len(), 1);
        assert_eq!(reading.refused_extensions, ["vector"]);
        assert_eq!(desired.redis, Some(RedisRequest::Claim(1)));
        assert_eq!(desired.profile, Profile::Paperless);
        assert_eq!(desired.deletion_policy, DeletionPolicy::Drop);
        assert_eq!(desired.rotate.as_deref(), Some("2026-11"));
        assert!(!desired.adopt);
    }

    #[test]
    fn wallabag_gets_no_redis() {
        let reading = read(
            "wallabag",
            &annotations(&[
                ("hearth.dev/postgres", "true"),
                ("hearth.dev/redis", "true"),
                ("hearth.dev/profile", "wallabag"),
            ]),
            &[],
        );
        assert!(reading.invalid.is_empty());
        assert!(reading.redis_refused);
        assert_eq!(reading.desired.redis, None);
        assert!(reading.desired.postgres.is_some());
    }

    #[test]
    fn no_annotations_means_not_opted_in() {
        let reading = read("x", &BTreeMap::new(), &[]);
        assert!(!reading.desired.opted_in());
        assert!(reading.invalid.is_empty());
    }

    #[test]
    fn every_bad_annotation_is_reported() {
        let reading = read(
            "x",
            &annotations(&[
                ("hearth.dev/postgres", "Bad;Name"),
                ("hearth.dev/redis", "16"),
                ("hearth.dev/profile", "nextcloud"),
            ]),
            &[],
        );
        let names: Vec<&str> = reading
            .invalid
            .iter()
            .map(|e| e.annotation.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "hearth.dev/postgres",
                "hearth.dev/redis",
                "hearth.dev/profile"
            ]
        );
        assert!(!reading.desired.opted_in());
    }
}
