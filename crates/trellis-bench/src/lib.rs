//! Benchmarks of Trellis against peers; see `benches/`.
