//! The router's home: one OS thread owns the [`Router`] (the policy and its books) and runs
//! what the async tasks hand it, in order, through a bounded queue. No async worker ever runs
//! an inference, a plan compilation or a planner rollout, and no task waits on a lock while
//! another decides: a task queues its job and awaits the answer (or, for bookkeeping, does not
//! wait at all). Decisions are taken one after another, so each sees the placement of the ones
//! before it.

use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use crate::router::Router;

/// Jobs the queue holds before a sender waits (decisions and bookkeeping alike).
pub const ROUTER_QUEUE: usize = 4096;

type Job = Box<dyn FnOnce(&mut Router) + Send>;

enum Message {
    Job(Job),
    Stop,
}

/// The router thread has stopped (the daemon is shutting down) or its job panicked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the router thread has stopped or its job failed")]
pub struct RouterStopped;

/// The handle the tasks share: queue jobs with [`RouterThread::ask`] (an answer is awaited) or
/// [`RouterThread::tell`] (bookkeeping: nothing to wait for).
pub struct RouterThread {
    jobs: mpsc::Sender<Message>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for RouterThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterThread")
            .field("queued", &(self.jobs.max_capacity() - self.jobs.capacity()))
            .finish_non_exhaustive()
    }
}

impl RouterThread {
    /// Starts the thread that owns `router`.
    pub fn start(router: Router) -> std::io::Result<Self> {
        let (jobs, mut queue) = mpsc::channel::<Message>(ROUTER_QUEUE);
        let thread = std::thread::Builder::new()
            .name("qosroute-router".into())
            .spawn(move || {
                let mut router = router;
                while let Some(Message::Job(job)) = queue.blocking_recv() {
                    // A panicking job (a bug) loses its answer, not the router: the asker
                    // gets `RouterStopped` and the thread goes on with the next job.
                    if std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut router))).is_err() {
                        tracing::error!("a router job panicked; its request gets an error");
                    }
                }
            })?;
        Ok(Self {
            jobs,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Runs `f` on the router thread, after every job queued before it, and returns its
    /// result.
    pub async fn ask<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Router) -> T + Send + 'static,
    ) -> Result<T, RouterStopped> {
        let (answer, answered) = oneshot::channel();
        let job: Job = Box::new(move |router| {
            let _ = answer.send(f(router));
        });
        self.jobs
            .send(Message::Job(job))
            .await
            .map_err(|_| RouterStopped)?;
        answered.await.map_err(|_| RouterStopped)
    }

    /// Queues `f` (bookkeeping: what the router learns or forgets) without waiting for it to
    /// run; waits only while the queue is full. Lost only once the router has stopped.
    pub async fn tell(&self, f: impl FnOnce(&mut Router) + Send + 'static) {
        if self.jobs.send(Message::Job(Box::new(f))).await.is_err() {
            tracing::debug!("router bookkeeping after the router stopped: dropped");
        }
    }

    /// Stops the thread once the jobs queued before this call have run, and waits for it.
    pub async fn stop(&self) {
        let _ = self.jobs.send(Message::Stop).await;
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let joined = tokio::task::spawn_blocking(move || thread.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::error!("the router thread ended abnormally");
            }
        }
    }
}

impl Drop for RouterThread {
    /// A handle dropped without [`RouterThread::stop`] (an early error) still ends its thread.
    fn drop(&mut self) {
        let thread = self.thread.get_mut().ok().and_then(Option::take);
        // With a full queue the thread is not waited for: it ends by itself once it has run
        // what is queued, when this handle's sender is gone.
        if let Some(thread) = thread
            && self.jobs.try_send(Message::Stop).is_ok()
        {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use tokio::time::Instant;

    use super::*;
    use crate::config::Config;

    fn router() -> Router {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let text = std::fs::read_to_string(format!("{root}/configs/qosrouted.example.toml"))
            .unwrap()
            .replace("model_dir = \"policy-model/models/han\"\n", "");
        let config = Config::parse(&text, "example").unwrap();
        Router::new(&config, None, Instant::now()).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_run_on_the_router_thread_in_the_order_they_were_queued() {
        let thread = RouterThread::start(router()).unwrap();
        let name = thread
            .ask(|_| std::thread::current().name().map(str::to_owned))
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("qosroute-router"));
        // Bookkeeping that is not awaited runs in order, before the next question, from
        // however many tasks.
        let ran = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tellers = tokio::task::JoinSet::new();
        let thread = std::sync::Arc::new(thread);
        for teller in 0..4u32 {
            let (thread, ran) = (thread.clone(), ran.clone());
            tellers.spawn(async move {
                for i in 0..2_000u32 {
                    let ran = ran.clone();
                    thread
                        .tell(move |_| ran.lock().unwrap().push((teller, i)))
                        .await;
                }
            });
        }
        tellers.join_all().await;
        let seen = thread
            .ask(move |_| ran.lock().unwrap().clone())
            .await
            .unwrap();
        assert_eq!(seen.len(), 8_000, "every job ran before the question");
        for teller in 0..4 {
            let order: Vec<u32> = seen
                .iter()
                .filter(|(t, _)| *t == teller)
                .map(|(_, i)| *i)
                .collect();
            assert_eq!(
                order,
                (0..2_000).collect::<Vec<_>>(),
                "teller {teller}'s jobs in order"
            );
        }
        thread.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_job_fails_its_asker_and_the_router_goes_on() {
        let thread = RouterThread::start(router()).unwrap();
        let failed = thread.ask(|_| -> u32 { panic!("a bug") }).await;
        assert_eq!(failed, Err(RouterStopped));
        let experts = thread.ask(|r| r.ledger.experts.len()).await.unwrap();
        assert!(experts > 0);
        thread.stop().await;
        assert_eq!(
            thread.ask(|r| r.ledger.experts.len()).await,
            Err(RouterStopped),
            "a stopped router answers nothing"
        );
    }

    #[test]
    fn a_dropped_handle_ends_its_thread() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let thread = RouterThread::start(router()).unwrap();
        // The router thread's own entry in /proc ("<pid>/task/<tid>").
        let task = runtime
            .block_on(thread.ask(|_| std::fs::read_link("/proc/thread-self").unwrap()))
            .unwrap();
        let task = std::path::Path::new("/proc").join(task);
        assert!(task.exists(), "{}", task.display());
        drop(thread);
        // Dropping joined the thread. Its /proc entry goes when the kernel has reaped it,
        // which under qemu-user (the aarch64 check of CI) came a moment after the join once:
        // a thread that never ends keeps it, one that ended loses it within milliseconds.
        let gone = (0..200).any(|_| {
            let gone = !task.exists();
            if !gone {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            gone
        });
        assert!(gone, "{} outlived its handle by 2 s", task.display());
    }
}
