//! The node's background tasks: every one is tracked, joined at shutdown,
//! and dropped if it still runs when the grace period ends. Tasks watch the
//! node's stop token themselves, to finish what they were doing first.

use std::{future::Future, time::Duration};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Where a node's parts spawn their background work (serving streams,
/// fetches started by the local API, session upkeep).
#[derive(Debug, Clone)]
pub(crate) struct Tasks {
    tracker: TaskTracker,
    /// Cancelled when the grace period has passed: whatever still runs is
    /// dropped at its next await.
    abort: CancellationToken,
}

impl Tasks {
    pub(crate) fn new() -> Self {
        Self {
            tracker: TaskTracker::new(),
            abort: CancellationToken::new(),
        }
    }

    /// Runs `task` in the background until it ends or the grace period of a
    /// shutdown has passed.
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let abort = self.abort.clone();
        // The tracker holds the task: `wait` is how it is joined.
        drop(self.tracker.spawn(async move {
            abort.run_until_cancelled(task).await;
        }));
    }

    /// Tasks still running.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Waits for every task, at most `grace`; then drops those left and
    /// waits for them to unwind. Returns how many had to be dropped.
    pub(crate) async fn wait(&self, grace: Duration) -> usize {
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let left = self.tracker.len();
        self.abort.cancel();
        self.tracker.wait().await;
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_tasks_that_end_within_the_grace_period() {
        let tasks = Tasks::new();
        let stop = CancellationToken::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stopped = stop.clone();
        tasks.spawn(async move {
            let stop = stopped;
            stop.cancelled().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = tx.send(());
        });
        assert_eq!(tasks.len(), 1);
        stop.cancel();
        assert_eq!(tasks.wait(Duration::from_secs(5)).await, 0);
        assert!(rx.await.is_ok(), "the task ran to its end");
        assert_eq!(tasks.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn drops_tasks_left_after_the_grace_period() {
        let tasks = Tasks::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async move {
            std::future::pending::<()>().await;
            drop(tx);
        });
        let started = tokio::time::Instant::now();
        assert_eq!(tasks.wait(Duration::from_secs(5)).await, 1);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(rx.await.is_err(), "the task was dropped, not finished");
        assert_eq!(tasks.len(), 0);
    }

    #[tokio::test]
    async fn a_task_spawned_after_wait_is_still_joined() {
        let tasks = Tasks::new();
        assert_eq!(tasks.wait(Duration::from_millis(10)).await, 0);
        let (tx, rx) = tokio::sync::oneshot::channel();
        tasks.spawn(async move {
            let _ = tx.send(());
        });
        assert!(rx.await.is_ok());
    }
}
