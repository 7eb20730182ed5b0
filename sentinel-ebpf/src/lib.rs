//! The eBPF programs live in the `sentinel` binary target (`src/main.rs`); this empty library
//! only lets `sentinel-user` name this crate as a build dependency.
#![no_std]
