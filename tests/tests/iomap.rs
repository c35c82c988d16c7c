//! The DIO layer in the guest: the no-allocation proof and the benchmark.

use dioxide_tests::*;

/// A dxfs image in `dir` holding one file, `data.bin`: 8 MiB of random
/// bytes from `seed`.
fn data_image(dir: &TempDir, seed: u64) -> std::path::PathBuf {
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut data = vec![0u8; 8 << 20];
    dioxide_testkit::Rng::new(seed).fill(&mut data);
    std::fs::write(src.join("data.bin"), &data).unwrap();
    let img = dir.path().join("fs.img");
    dioxide::fstool::mkfs(&img, &src, None, 4096, "").unwrap();
    img
}

#[test]
fn simple_path_reads_allocate_nothing_in_the_kernel() {
    let dir = TempDir::new("noalloc");
    let img = data_image(&dir, 3);
    for completion in ["poll", "irq"] {
        let out = boot(&config(
            Some(&img),
            &["selftest=noalloc", &format!("nvme.completion={completion}")],
        ));
        assert_eq!(out.status, 0, "console:\n{}", out.console);
        let lines: Vec<&str> = out.result_lines().collect();
        let line = |prefix: &str| -> &str {
            lines
                .iter()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} line:\n{}", out.console))
        };
        let field = |l: &str, k: &str| -> u64 {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {k}= in {l}"))
        };
        // Every read on the simple path, and the heap counters unchanged.
        let simple = line("noalloc simple ");
        assert!(
            simple.contains(
                "reads=100000 simple_path=100000 generic_path=0 fell_back=0 errors=0 allocs=0 frees=0 "
            ),
            "{simple}"
        );
        // The control: as many reads on the generic path, each allocating
        // its dio object, counted by the same counters.
        let generic = line("noalloc generic ");
        assert!(
            generic
                .contains("reads=100000 simple_path=0 generic_path=100000 fell_back=0 errors=0 "),
            "{generic}"
        );
        assert!(field(generic, "allocs") >= 100_000, "{generic}");
        assert!(field(generic, "frees") >= 100_000, "{generic}");
        assert!(lines.contains(&"noalloc ok"));
    }
}

#[test]
fn nbd_reads_through_tcp_nbd_dio_and_dxfs_allocate_nothing_in_the_kernel() {
    let dir = TempDir::new("nbd-noalloc");
    let img = data_image(&dir, 5);
    let out = boot(&config(Some(&img), &["selftest=nbd-noalloc"]));
    assert_eq!(out.status, 0, "console:\n{}", out.console);
    let lines: Vec<&str> = out.result_lines().collect();
    // The service, over its loopback wire to a client in the guest: every
    // read answered whole with the right bytes (errors counts wrong data),
    // and the heap counters unchanged (client included).
    for (target, export, reads) in [
        ("file", "data.bin", 100_000),
        ("raw", "nvme0n1", 10_000),
        ("null", "null", 10_000),
    ] {
        let want = format!(
            "nbd-noalloc target={target} export={export} reads={reads} qd=16 errors=0 allocs=0 frees=0 "
        );
        let line = lines
            .iter()
            .find(|l| l.starts_with(&want))
            .unwrap_or_else(|| panic!("no {want:?} line:\n{}", out.console));
        // The file's reads all took the simple path.
        if target == "file" {
            assert!(line.ends_with(" simple_path=100000"), "{line}");
        }
    }
    // The control: the simple path off, each read allocates its dio object,
    // and the same counters see it.
    let control = lines
        .iter()
        .find(|l| l.starts_with("nbd-noalloc control target=file simple=0 reads=2000 errors=0 "))
        .unwrap_or_else(|| panic!("no control line:\n{}", out.console));
    let count = |k: &str| -> u64 {
        control
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k}= in {control}"))
    };
    assert!(count("allocs") >= 2000, "{control}");
    assert!(count("frees") >= 2000, "{control}");
    assert!(lines.contains(&"nbd-noalloc ok"));
}

#[test]
fn bench_local_writes_table_json_and_plot() {
    let dir = TempDir::new("bench-local");
    let opts = dioxide::bench::LocalOpts {
        qds: vec![1, 8],
        devs: vec!["nvme".into(), "null".into()],
        completions: vec!["poll".into(), "irq".into()],
        ops: vec!["read".into()],
        secs: 1,
        out: dir.path().to_path_buf(),
        file_size: 8 << 20,
        accel: dioxide_qemu::accel::Accel::Tcg,
        mem: 256,
        host_ios: 100_000,
        host_threads: String::new(),
        from_log: None,
        boot: dioxide_qemu::Boot::Pvh,
        sweep: Default::default(),
    };
    assert_eq!(dioxide::bench::local(&opts).unwrap(), 0);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    // nvme poll + null poll + nvme irq, 2 queue depths, 3 targets.
    assert_eq!(rows.len(), 18, "{json:#}");
    for r in rows {
        for k in [
            "target",
            "dev",
            "completion",
            "qd",
            "iops",
            "lat_mean_us",
            "lat_p99_us",
            "cycles_per_io",
            "allocs_per_io",
            "simple_path",
            "generic_path",
            "fell_back",
        ] {
            assert!(!r[k].is_null(), "{k} missing in {r}");
        }
        assert!(r["iops"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["errors"].as_u64(), Some(0), "{r}");
        if r["target"] != "generic" {
            assert_eq!(r["allocs_per_io"].as_f64(), Some(0.0), "{r}");
        }
        // Each row was served by the path it is named after: a simple row
        // whose reads fell back to the generic path would be the generic
        // path's figure under the simple path's name.
        let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"));
        let ios = n("ios");
        assert!(ios > 0, "{r}");
        assert_eq!(n("fell_back"), 0, "{r}");
        let (simple, generic) = match r["target"].as_str().unwrap() {
            "simple" => (ios, 0),
            "generic" => (0, ios),
            _ => (0, 0),
        };
        assert_eq!(
            (n("simple_path"), n("generic_path")),
            (simple, generic),
            "{r}"
        );
    }
    // The table shows which path served the simple=1 reads.
    let table_rows: Vec<dioxide::bench::Row> = rows
        .iter()
        .map(|r| {
            let fields: Vec<(&str, String)> = r
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str().map_or(v.to_string(), String::from)))
                .collect();
            dioxide::bench::Row::new(&fields)
        })
        .collect();
    let table = dioxide::bench::table(&table_rows);
    assert!(
        table.contains("| simple=1 path: simple generic fell_back"),
        "{table}"
    );
    let host = json["host_rows"].as_array().unwrap();
    let targets: Vec<&str> = host.iter().map(|h| h["target"].as_str().unwrap()).collect();
    assert_eq!(
        targets,
        ["raw", "generic", "simple", "raw-write", "simple-write"]
    );
    for h in host {
        for k in ["target", "ns_per_io", "cycles_per_io", "allocs_per_io"] {
            assert!(!h[k].is_null(), "{k} missing in {h}");
        }
        // The host rows too were served by the path they are named after.
        let n = |k: &str| h[k].as_u64().unwrap_or_else(|| panic!("{k} in {h}"));
        let want = match h["target"].as_str().unwrap() {
            "simple" | "simple-write" => (100_000, 0),
            "generic" => (0, 100_000),
            _ => (0, 0),
        };
        assert_eq!(
            (n("simple_path"), n("generic_path"), n("fell_back")),
            (want.0, want.1, 0),
            "{h}"
        );
    }
    let svg = std::fs::read_to_string(dir.path().join("plot.svg")).unwrap();
    assert!(
        svg.starts_with("<svg")
            && svg.contains("dev=null completion=poll")
            && svg.contains("polyline")
    );
}
