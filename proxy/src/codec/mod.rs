//! HTTP/1.1 on the wire, in both directions: heads parsed in place
//! ([`head`]) and bodies framed, collected and relayed ([`body`]).
//!
//! The HTTP/1.x front end ([`crate::h1`]) reads clients with it; the
//! request core ([`crate::request`]) speaks it to every backend, whatever
//! protocol the client used.

pub mod body;
pub mod head;
