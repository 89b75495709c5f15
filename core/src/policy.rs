//! The `Policy` trait: given the cluster state, an arriving request and what the router has
//! learned, pick an expert or reject.

use crate::knowledge::Observed;
use crate::request::ArrivingRequest;
use crate::state::ClusterState;

/// What a policy decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Send the request to the expert with this index in [`ClusterState::experts`].
    Route(usize),
    /// Refuse the request (it earns QoS 0, but costs no other request anything).
    Reject,
}

/// A router. Policies see predicted output lengths and predicted quality only, never the
/// true ones: [`ArrivingRequest`], [`ClusterState`] and [`Observed`] hold no truth and no
/// future arrival.
pub trait Policy {
    /// Short name, as the CLI spells it.
    fn name(&self) -> &str;

    /// Decide where `arriving` goes. Must return `Route(e)` only for an eligible expert
    /// ([`ClusterState::is_eligible`]); otherwise the caller treats it as a rejection.
    /// `observed` is what the router has learned (length distributions, quality estimates,
    /// recent arrivals); policies that score the state alone ignore it.
    fn decide(
        &mut self,
        state: &ClusterState,
        arriving: &ArrivingRequest,
        observed: &Observed<'_>,
    ) -> Decision;
}

impl<P: Policy + ?Sized> Policy for Box<P> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn decide(
        &mut self,
        state: &ClusterState,
        arriving: &ArrivingRequest,
        observed: &Observed<'_>,
    ) -> Decision {
        (**self).decide(state, arriving, observed)
    }
}
