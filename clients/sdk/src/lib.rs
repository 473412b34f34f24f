//! Client SDK for the federation relay.
