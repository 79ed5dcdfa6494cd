//! Host bindings of our WIT world (`wit/saga-runtime@0.1.1`, which also serves components built
//! against 0.1.0: wasmtime links semver-compatible names). Imports and exports are async (see
//! `crate::wasm`: calls run on the calling task). Every import is trappable: a
//! failure of the host (e.g. the database is down during a state read) traps the call, and the
//! caller treats it as a retryable failure, never as an answer the guest can misread.

wasmtime::component::bindgen!({
    world: "service",
    path: "../wit/saga-runtime@0.1.1",
    imports: { default: async | trappable },
    exports: { default: async },
    additional_derives: [PartialEq, serde::Serialize, serde::Deserialize],
});

pub use exports::saga::runtime::handler::{
    Context, Effects, Error as GuestError, Request, Response,
};
pub use saga::runtime::types::{
    DeadLetter, Deadline, DeadlineRef, Emit, Event, FailurePolicy, Manifest, Payload, Reply, Route,
    Subscription, Write,
};

impl Effects {
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
            && self.emits.is_empty()
            && self.set_deadlines.is_empty()
            && self.cancel_deadlines.is_empty()
    }

    pub fn none() -> Self {
        Effects {
            writes: Vec::new(),
            emits: Vec::new(),
            set_deadlines: Vec::new(),
            cancel_deadlines: Vec::new(),
        }
    }
}
