//! The tunnel client: [`connect`] dials, [`session`] runs one session,
//! [`supervisor`] reconnects forever and owns the deliveries.

pub mod connect;
pub mod pause;
pub mod session;
pub mod supervisor;
