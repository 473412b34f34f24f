//! The federation relay: sessions with platforms and broadcasters, routing, and the durable
//! store-and-forward queue between them.

pub mod store;
