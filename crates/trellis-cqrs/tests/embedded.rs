//! The CQRS suite on the embedded event store and the embedded state store, each in
//! a tempdir of its own.

mod support;

support::cqrs_suite!(support::embedded());
