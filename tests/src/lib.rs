//! Helpers for the end-to-end tests: find the built binaries, pick free ports, wait for servers.
