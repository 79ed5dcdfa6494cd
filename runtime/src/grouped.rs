//! Serving a queue in groups: what queued while the groups before it were being served is
//! served together. No timer gathers a group — at low load an item goes alone, at once; under
//! load the groups on their way are the only wait. Used by the commits of HTTP commands
//! (`crate::commands`) and by guests' state reads on PostgreSQL (`storage::state::Gatherer`).

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};

/// Serve `queue` until every sender is gone: whenever fewer than `in_flight` groups are being
/// served, take the next item and whatever else is queued then, up to `max`, and hand them to
/// `serve` on a task of their own.
pub async fn serve<T, F, Fut>(mut queue: mpsc::Receiver<T>, in_flight: usize, max: usize, serve: F)
where
    T: Send + 'static,
    F: Fn(Vec<T>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(in_flight));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            return;
        };
        let mut group = vec![first];
        while group.len() < max {
            match queue.try_recv() {
                Ok(item) => group.push(item),
                Err(_) => break,
            }
        }
        let served = serve(group);
        tokio::spawn(async move {
            served.await;
            drop(slot);
        });
    }
}
