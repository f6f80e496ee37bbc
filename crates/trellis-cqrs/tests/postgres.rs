//! The CQRS suite on the PostgreSQL event store and the PostgreSQL state store, each
//! test in schemas of its own.

mod support;

support::cqrs_suite!(support::postgres());
