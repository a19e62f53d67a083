//! A whole stack for db-provisioner's end-to-end tests and benchmark: the fake Kubernetes API,
//! a real PostgreSQL and Redis, and the real binary started as a process.

#![allow(dead_code, unused_macros, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use hearth_tests::admin::ServiceProcess;
use hearth_tests::{FakeApiServer, PostgresServer, RedisServer};
pub use hearth_tests::{eventually, metric};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tempfile::TempDir;

/// `redis_command!(&mut connection, "SELECT", 3)`: sends one command and awaits its reply,
/// typed as the caller asks.
macro_rules! redis_command {
    ($connection:expr, $command:literal $(, $arg:expr)* $(,)?) => {
        redis::cmd($command)$(.arg($arg))*.query_async($connection).await
    };
}

pub struct Stack {
    pub api: FakeApiServer,
    pub client: Client,
    pub postgres: PostgresServer,
    pub redis: RedisServer,
    pub admin_url: String,
    /// The PostgreSQL major version the tests run on (15 or 16, see `HEARTH_POSTGRES_BINDIR`).
    pub pg_major: u32,
    kubeconfig: PathBuf,
    _dir: TempDir,
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with_redis(&[]).await
    }

    pub async fn start_with_redis(redis_args: &[&str]) -> Self {
        let api = FakeApiServer::start().await.unwrap();
        let client = api.client().unwrap();
        let (postgres, redis) =
            tokio::join!(PostgresServer::start(), RedisServer::start_with(redis_args));
        let (postgres, redis) = (postgres.unwrap(), redis.unwrap());
        // The admin is not a superuser: CREATEDB and CREATEROLE are all db-provisioner needs.
        postgres
            .connect()
            .await
            .unwrap()
            .batch_execute(
                "CREATE ROLE hearth_admin LOGIN CREATEDB CREATEROLE PASSWORD 'AdminPassword42'",
            )
            .await
            .unwrap();
        let admin_url = format!(
            "postgres://hearth_admin:AdminPassword42@127.0.0.1:{}/postgres",
            postgres.port()
        );
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        let pg_major = postgres.major_version().await.unwrap();
        let stack = Self {
            api,
            client,
            postgres,
            redis,
            admin_url,
            pg_major,
            kubeconfig,
            _dir: dir,
        };
        // Where db-provisioner keeps its state, and where Events about Namespaces go.
        stack.create_namespace("hearth-system").await;
        stack.create_namespace("default").await;
        stack
    }

    pub async fn provisioner(&self, pod: &str, extra: &[(&str, &str)]) -> ServiceProcess {
        let kubeconfig = self.kubeconfig.display().to_string();
        let redis_url = self.redis.url();
        let mut env = vec![
            ("KUBECONFIG", kubeconfig.as_str()),
            ("POSTGRES_ADMIN_URL", self.admin_url.as_str()),
            ("POSTGRES_APP_HOST", "pg.db.svc"),
            ("REDIS_ADMIN_URL", redis_url.as_str()),
            ("POD_NAME", pod),
            ("POD_NAMESPACE", "hearth-system"),
            ("RESYNC_INTERVAL", "1s"),
            ("POSTGRES_EXTENSIONS_ALLOWED", "pg_trgm,citext"),
            ("RUST_LOG", "info,db_provisioner=debug"),
        ];
        env.extend_from_slice(extra);
        let binary = PathBuf::from(env!("CARGO_BIN_EXE_db-provisioner"));
        ServiceProcess::start(&binary, &env).await.unwrap()
    }

    pub async fn create_namespace(&self, name: &str) {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap();
    }

    /// Sets annotations on a namespace, creating it if needed; `None` removes one.
    pub async fn annotate(&self, name: &str, annotations: &[(&str, Option<&str>)]) {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        if namespaces.get_opt(name).await.unwrap().is_none() {
            self.create_namespace(name).await;
        }
        let values: serde_json::Map<String, serde_json::Value> = annotations
            .iter()
            .map(|(key, value)| ((*key).to_owned(), json!(value)))
            .collect();
        let patch = json!({"metadata": {"annotations": values}});
        namespaces
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    pub async fn namespace(&self, name: &str) -> Option<Namespace> {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        namespaces.get_opt(name).await.unwrap()
    }

    /// Secret `hearth-db` of a namespace, decoded.
    pub async fn secret(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let secret = secrets.get_opt("hearth-db").await.ok()??;
        Some(
            secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8(v.0).unwrap()))
                .collect(),
        )
    }

    /// Every Event db-provisioner wrote (Events about Namespaces live in `default`).
    pub async fn events(&self) -> Vec<Event> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), "default");
        events.list(&ListParams::default()).await.unwrap().items
    }

    pub async fn events_about(&self, namespace: &str) -> Vec<(String, String)> {
        hearth_tests::events::about(&self.client, namespace)
            .await
            .into_iter()
            .map(|seen| (seen.reason, seen.note))
            .collect()
    }

    /// Every Event about a namespace, as (type, reason, action, note).
    pub async fn events_in_full(&self, namespace: &str) -> Vec<(String, String, String, String)> {
        hearth_tests::events::about(&self.client, namespace)
            .await
            .into_iter()
            .map(|seen| (seen.type_, seen.reason, seen.action, seen.note))
            .collect()
    }

    /// Waits for an Event with `reason` about a namespace; its note.
    pub async fn wait_for_event(&self, namespace: &str, reason: &str) -> String {
        hearth_tests::events::wait_for(&self.client, namespace, reason).await
    }

    /// Whether the server has an extension's files installed.
    pub async fn extension_installed(&self, name: &str) -> bool {
        self.superuser()
            .await
            .query_one(
                "SELECT count(*) > 0 FROM pg_available_extensions WHERE name = $1",
                &[&name],
            )
            .await
            .unwrap()
            .get(0)
    }

    pub async fn superuser(&self) -> tokio_postgres::Client {
        self.postgres.connect().await.unwrap()
    }

    /// Logs in as an app role; `Err` when the password or database is wrong.
    pub async fn login(
        &self,
        user: &str,
        password: &str,
        database: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let url = format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{database}",
            self.postgres.port()
        );
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    pub async fn redis_admin(&self) -> redis::aio::MultiplexedConnection {
        self.redis.connect().await.unwrap()
    }

    pub async fn redis_as(
        &self,
        user: &str,
        password: &str,
    ) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let url = format!("redis://{user}:{password}@127.0.0.1:{}/", self.redis.port());
        redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await
    }
}

pub async fn metrics(process: &ServiceProcess) -> String {
    process.get("/metrics").await.unwrap().body
}
