//! The in-kernel benchmark as a server runs it: `bench.*` kernel arguments
//! alone, results as JSON lines that `dioxide bench local --from-log` reads.

use dioxide::bench::console_rows;
use dioxide::fstool;
use dioxide_tests::*;

#[test]
fn bench_arguments_alone_run_the_benchmark_and_print_json_rows() {
    let dir = TempDir::new("bench-json");
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    random_image(&src.join("data.bin"), 8 << 20, 11);
    let img = dir.path().join("fs.img");
    assert_eq!(fstool::mkfs(&img, &src, None, 4096, "bench").unwrap(), 0);
    let cfg = config(
        Some(&img),
        &[
            "bench.qd=1,4",
            "bench.dev=null,nvme",
            "bench.op=read,write-fua",
            "bench.secs=1",
        ],
    );
    let out = boot(&cfg);
    assert_eq!(out.status, 0, "console:\n{}", out.console);
    let (rows, error) = console_rows(&out.console);
    assert_eq!(error, None, "console:\n{}", out.console);
    assert_eq!(rows.len(), 2 * 2 * 2 * 3, "console:\n{}", out.console);
    for op in ["read", "write-fua"] {
        assert_eq!(
            rows.iter().filter(|r| r.s("op") == op).count(),
            2 * 2 * 3,
            "{op}: console:\n{}",
            out.console
        );
    }
    for r in &rows {
        assert!(r.f("ios") > 0.0 && r.f("iops") > 0.0, "{r:?}");
        assert_eq!(r.f("errors"), 0.0, "{r:?}");
        assert!(
            ["raw", "generic", "simple"].contains(&r.s("target")),
            "{r:?}"
        );
        if r.s("target") == "simple" {
            // Every request of the row (read or overwrite) went the simple
            // path, none the generic.
            assert_eq!(r.f("fell_back"), 0.0, "{r:?}");
            assert_eq!(r.f("simple_path"), r.f("ios"), "{r:?}");
            assert_eq!(r.f("generic_path"), 0.0, "{r:?}");
            assert_eq!(r.f("allocs_per_io"), 0.0, "{r:?}");
        }
        if r.s("target") == "generic" {
            // The control: the same reads through the generic path are
            // counted there, and allocate (each its dio object), so the
            // simple rows' 0 allocations come from a counter that counts.
            assert_eq!(r.f("simple_path"), 0.0, "{r:?}");
            assert_eq!(r.f("generic_path"), r.f("ios"), "{r:?}");
            assert!(r.f("allocs_per_io") > 0.0, "{r:?}");
        }
    }
    assert!(
        out.console
            .lines()
            .any(|l| l.trim() == r#"{"bench":"done"}"#),
        "console:\n{}",
        out.console
    );
    // The writes (overwrites of the file's blocks, raw writes inside its
    // largest extent) left the filesystem as it was.
    assert_eq!(fstool::fsck(&img, false).unwrap(), 0);

    // A bad list is refused before anything runs.
    let out = boot(&config(Some(&img), &["bench.dev=nvme,floppy"]));
    assert_eq!(out.status, 2, "console:\n{}", out.console);
    assert!(
        out.console.contains("\"floppy\" is not nvme or null"),
        "{}",
        out.console
    );
    let out = boot(&config(Some(&img), &["bench.op=read,append"]));
    assert_eq!(out.status, 2, "console:\n{}", out.console);
    assert!(
        out.console
            .contains("\"append\" is not read, write or write-fua"),
        "{}",
        out.console
    );
}
