//! One shutdown signal for the whole process, fanned out to every task, with a bounded drain.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Error;

/// How long tasks get to finish after the signal; Kubernetes allows 30 s before SIGKILL.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(20);

#[derive(Clone)]
pub struct Shutdown {
    token: CancellationToken,
    tasks: TaskTracker,
    first_failure: Arc<Mutex<Option<Error>>>,
    drain: Duration,
}

impl Shutdown {
    pub fn new(drain: Duration) -> Self {
        Self {
            token: CancellationToken::new(),
            tasks: TaskTracker::new(),
            first_failure: Arc::default(),
            drain,
        }
    }

    /// Cancelled once, when the process begins to stop; every task selects on it.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Starts shutdown as a signal would.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Runs a task that the drain waits for. A task that fails stops the whole process, so a
    /// dead controller loop is restarted by Kubernetes instead of leaving a half-working pod.
    pub fn spawn<F>(&self, name: &'static str, task: F)
    where
        F: Future<Output = Result<(), Error>> + Send + 'static,
    {
        let token = self.token.clone();
        let first_failure = Arc::clone(&self.first_failure);
        self.tasks.spawn(async move {
            if let Err(error) = task.await {
                tracing::error!(task = name, error = %error, "task failed; shutting down");
                first_failure
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_or_insert(error);
                token.cancel();
            }
        });
    }

    /// Turns the first SIGTERM or SIGINT into shutdown; a second one ends the process at once.
    pub fn listen_for_signals(&self) -> Result<(), Error> {
        let mut terminate = signal(SignalKind::terminate()).map_err(Error::Signal)?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
        let token = self.token.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
                () = token.cancelled() => {}
            }
            tracing::info!("shutdown signal received; draining");
            token.cancel();
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
            tracing::warn!("second signal received; exiting without draining");
            std::process::exit(130);
        });
        Ok(())
    }

    /// Waits for the signal, then for every task up to the drain deadline. Returns the first
    /// task failure, if any, so `main` exits non-zero.
    pub async fn wait(self) -> Result<(), Error> {
        self.token.cancelled().await;
        self.tasks.close();
        if tokio::time::timeout(self.drain, self.tasks.wait())
            .await
            .is_err()
        {
            return Err(Error::DrainTimedOut(self.drain));
        }
        let failure = self
            .first_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        failure.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_task_sees_the_signal_and_is_waited_for() {
        let shutdown = Shutdown::new(Duration::from_secs(5));
        let (finished_tx, mut finished_rx) = tokio::sync::mpsc::channel(2);
        for _ in 0..2 {
            let token = shutdown.token();
            let finished = finished_tx.clone();
            shutdown.spawn("worker", async move {
                token.cancelled().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                finished.send(()).await.ok();
                Ok(())
            });
        }
        shutdown.trigger();
        shutdown.clone().wait().await.unwrap();
        assert!(finished_rx.try_recv().is_ok());
        assert!(finished_rx.try_recv().is_ok());
    }

    #[tokio::test]
    async fn the_drain_is_bounded() {
        let shutdown = Shutdown::new(Duration::from_millis(100));
        shutdown.spawn("stuck", async {
            std::future::pending::<()>().await;
            Ok(())
        });
        shutdown.trigger();
        let error = shutdown.wait().await.unwrap_err();
        assert!(matches!(error, Error::DrainTimedOut(_)), "{error}");
    }

    #[tokio::test]
    async fn a_failed_task_stops_the_process_and_is_reported() {
        let shutdown = Shutdown::new(Duration::from_secs(5));
        shutdown.spawn("broken", async {
            Err(Error::Signal(std::io::Error::other("broken")))
        });
        let error = shutdown.wait().await.unwrap_err();
        assert!(matches!(error, Error::Signal(_)), "{error}");
    }
}
