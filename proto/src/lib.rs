//! The device wire format: requests, reply chunks, errors, feedback; postcard and JSON; no_std.
