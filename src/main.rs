//! The `riskserve` binary: everything lives in the library; see `riskserve::cli`.

/// mimalloc rather than glibc's malloc: the request threads allocate what the decision log's
/// writer and indexer threads free, and glibc returns each such block to its arena under a
/// lock (BENCHMARKS.md, "the allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    riskserve::cli::main()
}
