//! The dioxide kernel.
//!
//! Boot order: ACPI facts (on the boot loader's identity map, no heap), TSC
//! calibration, console, descriptor tables, memory (frames, page tables,
//! heap), local APIC, the other CPUs (`smp`), PCI, NVMe; then a self-test
//! or the appliance's run loop. Any failure is reported on the console and ends in a
//! power-off with a status the host reads (see [`power`]).
#![no_std]
#![no_main]
#![deny(clippy::undocumented_unsafe_blocks)]

extern crate alloc;

mod block;
mod diag;
mod drivers;
mod mm;
mod net;
mod platform;

use block::disk;
use diag::{bench, selftest};
use drivers::{nvme, pci};
use net::{nbd, stack};
use platform::{acpi, apic, cmdline, gdt, idt, power, serial, smp, time};

use cmdline::Cmdline;
use dioxide_boot::BootInfo;
use power::{EXIT_CONFIG, EXIT_DEVICE};

dioxide_boot::entry_point!(kmain);

pub(crate) fn fail(status: u8, what: core::fmt::Arguments) -> ! {
    log::error!(target: "boot", "{what}");
    nvme::power_off(status)
}

/// The boot, in steps: the console and the boot CPU's tables, the
/// arguments, memory, the other CPUs, PCI and the NVMe drives, dxfs; then
/// a self-test, the benchmark or the NBD service.
fn kmain(boot: &'static BootInfo) -> ! {
    let args = Cmdline::new(boot.cmdline());
    let facts = early_boot(boot, &args);
    let selftest = selftest_name(&args);
    if selftest == "calibrate" {
        selftest::calibrate();
    }
    let opts = nvme_options(&args);
    let rw_blocks = match args.number("rw.blocks") {
        Ok(v) => v,
        Err(v) => fail(
            EXIT_CONFIG,
            format_args!("rw.blocks={v:?}: expected a number of blocks"),
        ),
    };
    memory(boot, facts);
    if selftest == "fault" {
        selftest::fault();
    }
    if selftest == "panic" {
        selftest::panic();
    }
    cpus(&args);
    match selftest {
        "smp" => diag::smp::selftest(),
        "ap-panic" => diag::smp::ap_panic(),
        _ => {}
    }
    pci::init(facts.ok().and_then(|f| f.ecam()));
    let functions = pci::enumerate();
    x86_64::instructions::interrupts::enable();
    disks(&functions, opts);
    let mut mounts = disk::mount_all();
    match selftest {
        "files" => selftest::files(&mounts),
        "noalloc" => bench::noalloc(first_fs(&mut mounts)),
        "nbd-noalloc" => diag::nbd::noalloc(&mounts),
        "bench" => run_bench(boot, &args, &mut mounts),
        "digest" => selftest::digest(),
        "rw" => selftest::rw(rw_blocks),
        _ => serve(&args, &functions, &mounts, opts.mode),
    }
}

/// The log level, ACPI (on the boot loader's identity map, without a
/// heap: time needs the HPET and the PM timer, power the FADT and _S5_),
/// the TSC's calibration, the console, the boot line, the GDT and IDT, and
/// the 8259s masked. Bad power or time arguments end the boot here.
fn early_boot(
    boot: &'static BootInfo,
    args: &Cmdline,
) -> Result<&'static dioxide_firmware::acpi::Facts, dioxide_firmware::acpi::AcpiError> {
    let level = match args.get("log") {
        Some("error") => log::LevelFilter::Error,
        Some("warn") => log::LevelFilter::Warn,
        Some("debug") => log::LevelFilter::Debug,
        Some("trace") => log::LevelFilter::Trace,
        _ => log::LevelFilter::Info,
    };
    let power_args = power::configure(args.get("power"), args.get("panic"));
    // The BIOS areas are scanned for the RSDP only when the firmware may
    // be a BIOS (on UEFI they hold nothing of the kind: the RSDP comes from
    // the boot loader's tag).
    let facts = acpi::early(boot, boot.firmware != dioxide_boot::Firmware::Uefi);
    let calibration = time::calibrate(facts.ok(), args.get("time.source"));
    serial::init(level, facts.ok().and_then(|f| f.spcr.as_ref()));
    log::info!(
        target: "boot",
        "dioxide {} via {:?}, cmdline {:?}, firmware {:?}",
        env!("CARGO_PKG_VERSION"),
        boot.protocol,
        boot.cmdline(),
        boot.firmware
    );
    acpi::log_summary(facts);
    match &calibration {
        Ok(c) => time::log_calibration(c),
        Err(e) => fail(EXIT_CONFIG, format_args!("{e}")),
    }
    if let Err(e) = power_args {
        fail(EXIT_CONFIG, format_args!("{e}"));
    }
    for k in args.keys() {
        if !cmdline::KNOWN.contains(&k) {
            log::warn!(target: "boot", "unknown kernel argument {k:?} ignored");
        }
    }
    gdt::init();
    idt::init();
    if facts.map_or(true, |f| f.has_8259()) {
        apic::disable_pic();
    } else {
        log::info!(target: "boot", "no 8259 PICs (MADT PCAT_COMPAT clear): none to mask");
    }
    facts
}

/// The self-test asked for (`""`: none). `bench.*` arguments alone run the
/// in-kernel benchmark (a server booted from the image has no host CLI to
/// ask for `selftest=bench`).
fn selftest_name<'a>(args: &Cmdline<'a>) -> &'a str {
    let selftest = match args.get("selftest") {
        Some(s) => s,
        None if args.keys().any(|k| k.starts_with("bench.")) => "bench",
        None => "",
    };
    if ![
        "",
        "digest",
        "rw",
        "files",
        "bench",
        "noalloc",
        "nbd-noalloc",
        "fault",
        "panic",
        "calibrate",
        "smp",
        "ap-panic",
    ]
    .contains(&selftest)
    {
        fail(
            EXIT_CONFIG,
            format_args!("unknown self-test {selftest:?} (digest, rw, files, bench, noalloc, nbd-noalloc, fault, panic, calibrate, smp, ap-panic)"),
        );
    }
    selftest
}

/// How the NVMe controllers are brought up (`nvme.*`, `dio.simple`).
fn nvme_options(args: &Cmdline) -> nvme::Options {
    let mode = match args.get("nvme.completion") {
        None | Some("poll") => nvme::Mode::Poll,
        Some("irq") => nvme::Mode::Irq,
        Some(v) => fail(
            EXIT_CONFIG,
            format_args!("nvme.completion={v:?}: expected poll or irq"),
        ),
    };
    let timeout_ms = match args.number("nvme.timeout_ms") {
        Ok(v) => v.unwrap_or(5000).max(1),
        Err(v) => fail(
            EXIT_CONFIG,
            format_args!("nvme.timeout_ms={v:?}: expected milliseconds"),
        ),
    };
    let (dbbuf, dbbuf_keep) = match args.get("nvme.dbbuf") {
        None | Some("1") => (true, false),
        Some("keep") => (true, true),
        Some("0") => (false, false),
        Some(v) => fail(
            EXIT_CONFIG,
            format_args!("nvme.dbbuf={v:?}: expected 0, 1 or keep"),
        ),
    };
    let kick_ms = match args.number("nvme.kick_ms") {
        Ok(v) => v.unwrap_or(dioxide_nvme::DEFAULT_KICK_NS / 1_000_000),
        Err(v) => fail(
            EXIT_CONFIG,
            format_args!("nvme.kick_ms={v:?}: expected milliseconds (0: never)"),
        ),
    };
    let simple = match args.switch("dio.simple") {
        Ok(v) => v.unwrap_or(true),
        Err(v) => fail(
            EXIT_CONFIG,
            format_args!("dio.simple={v:?}: expected 0 or 1"),
        ),
    };
    nvme::Options {
        mode,
        timeout_ms,
        dbbuf,
        dbbuf_keep,
        kick_ms,
        simple,
    }
}

/// The memory map logged, frames, page tables and the heap, the SPCR's
/// UART (first: it is shown the early lines as the screen is), the screen,
/// and the ACPI power registers mapped.
fn memory(
    boot: &'static BootInfo,
    facts: Result<&'static dioxide_firmware::acpi::Facts, dioxide_firmware::acpi::AcpiError>,
) {
    let usable: u64 = boot
        .memory_map()
        .iter()
        .filter(|r| r.kind == dioxide_boot::MemoryKind::Usable)
        .map(|r| r.len)
        .sum();
    log::info!(target: "mm", "{} memory map entries, {} MiB usable, kernel {:#x}..{:#x}", boot.memory_map().len(), usable >> 20, boot.kernel_start, boot.kernel_end);
    if let Err(e) = mm::init(boot) {
        fail(EXIT_CONFIG, format_args!("memory set-up failed: {e}"));
    }
    if let Some(spcr) = facts.ok().and_then(|f| f.spcr.as_ref()) {
        serial::add_spcr(spcr);
    }
    serial::attach_screen(boot);
    power::map_registers();
}

/// The local APIC and its 10 ms tick, then the other CPUs (`smp=` caps
/// them).
fn cpus(args: &Cmdline) {
    apic::init();
    apic::start_tick(10);
    match args.number("smp") {
        Ok(cap) => smp::init(cap),
        Err(v) => fail(
            EXIT_CONFIG,
            format_args!("smp={v:?}: expected a number of CPUs"),
        ),
    }
}

/// Every NVMe controller on PCI and its namespaces; the boot fails
/// without one. Logs the ready line.
fn disks(functions: &[pci::Function], opts: nvme::Options) {
    let disks = match nvme::init(functions, opts) {
        Ok([]) if !functions.iter().any(nvme::is_nvme) => {
            fail(EXIT_CONFIG, format_args!("no NVMe controller found on PCI"))
        }
        Ok([]) => fail(
            EXIT_DEVICE,
            format_args!("no usable NVMe namespace (every controller's error is above)"),
        ),
        Ok(d) => d,
        Err(e) => fail(EXIT_DEVICE, format_args!("nvme: {e}")),
    };
    let heap = mm::heap::stats();
    log::info!(
        target: "boot",
        "ready in {} ms: {} namespace(s) ({}), heap {} KiB used of {} MiB",
        time::now_ns() / 1_000_000,
        disks.len(),
        disks
            .iter()
            .map(|d| alloc::format!("{} {} MiB, {}-byte blocks", d.name, d.bytes() >> 20, d.ns.block_size))
            .collect::<alloc::vec::Vec<_>>()
            .join("; "),
        heap.bytes_in_use / 1024,
        heap.size >> 20
    );
    log::info!(target: "iomap", "simple path {}", if opts.simple { "on" } else { "off (dio.simple=0)" });
}

/// `selftest=bench` with its `bench.*` arguments.
fn run_bench(
    boot: &'static BootInfo,
    args: &Cmdline,
    mounts: &mut alloc::vec::Vec<disk::Mounted>,
) -> ! {
    let list = |k: &str, d: &'static str| args.get(k).unwrap_or(d);
    let qds: alloc::vec::Vec<usize> = list("bench.qd", "1,16,64,128,256")
        .split(',')
        .filter_map(|q| q.parse().ok())
        .collect();
    let devs: alloc::vec::Vec<&str> = list("bench.dev", "nvme,null").split(',').collect();
    let comps: alloc::vec::Vec<&str> = list("bench.completion", "poll").split(',').collect();
    // Writes overwrite the benchmark's file (see `bench::Rw`): only when asked.
    let mut ops = alloc::vec::Vec::new();
    for o in list("bench.op", "read").split(',') {
        match bench::Rw::parse(o) {
            Some(rw) => ops.push(rw),
            None => fail(
                EXIT_CONFIG,
                format_args!("bench.op: {o:?} is not read, write or write-fua"),
            ),
        }
    }
    if let Some(d) = devs.iter().find(|d| !["nvme", "null"].contains(d)) {
        fail(
            EXIT_CONFIG,
            format_args!("bench.dev: {d:?} is not nvme or null"),
        );
    }
    if let Some(c) = comps.iter().find(|c| !["poll", "irq"].contains(c)) {
        fail(
            EXIT_CONFIG,
            format_args!("bench.completion: {c:?} is not poll or irq"),
        );
    }
    if qds.is_empty() {
        fail(
            EXIT_CONFIG,
            format_args!("bench.qd: expected queue depths such as 1,16,64"),
        );
    }
    let secs = args.number("bench.secs").ok().flatten().unwrap_or(2).max(1);
    let protocol = alloc::format!("{:?}", boot.protocol).to_lowercase();
    let firmware = alloc::format!("{:?}", boot.firmware).to_lowercase();
    let p = bench::Params {
        qds: &qds,
        ops: &ops,
        devs: &devs,
        completions: &comps,
        secs,
        file: args.get("bench.file"),
        protocol: &protocol,
        firmware: &firmware,
    };
    bench::bench(0, first_fs(mounts), &p)
}

/// The network (virtio-net with the offloads asked for, a static address
/// or DHCP) and the NBD service, then the run loop.
fn serve(
    args: &Cmdline<'static>,
    functions: &[pci::Function],
    mounts: &[disk::Mounted],
    mode: nvme::Mode,
) -> ! {
    let static_ip = match args.get("net.ip") {
        None => None,
        Some(v) => match stack::parse_cidr(v) {
            Some(cidr) => Some(stack::StaticIp {
                cidr,
                gateway: args.get("net.gw").and_then(stack::parse_ip),
            }),
            None => fail(
                EXIT_CONFIG,
                format_args!("net.ip={v:?}: expected A.B.C.D/N"),
            ),
        },
    };
    drivers::virtio_net::configure(net_offloads(args));
    let service = ServiceArgs::from(args, mode);
    let addressing = match static_ip {
        Some(s) => stack::Addressing::Static(s),
        None => stack::Addressing::Dhcp,
    };
    let Some(found) = net::nic::find(functions, args.get("net.nic")) else {
        run_loop::<drivers::virtio_net::NetDevice>(None, None)
    };
    match found {
        net::nic::Found::Virtio(mut devs, mac) if devs.len() == 1 => {
            let Some(dev) = devs.pop() else {
                run_loop::<drivers::virtio_net::NetDevice>(None, None)
            };
            let mut n = stack::init(dev, mac, addressing);
            let server = nbd::start(&mut n, mounts, &service);
            run_loop(Some(n), Some(server))
        }
        net::nic::Found::Virtio(devs, mac) => {
            net::nic::serve_virtio(devs, mac, mounts, &service, addressing)
        }
        net::nic::Found::Igb(nic) => net::nic::serve_igb(nic, mounts, &service, addressing),
    }
}

/// The NBD service's kernel arguments (`nbd.null=`, `nbd.stall_s=`,
/// `nbd.storage_cores=`, `nbd.rw=`, `nbd.rw_from=`, `nbd.allow=`).
pub struct ServiceArgs {
    pub null: bool,
    /// `nbd.rw=`: which exports take writes (`all`, `namespaces`, or
    /// names separated by commas; `net::nbd::writable`).
    pub rw: Option<&'static str>,
    /// `nbd.allow=`, `nbd.rw_from=`: who may connect, who may write.
    pub access: dioxide_service::Access,
    pub stall_ns: u64,
    /// `dxfs.commit_s`: how often the write paths commit unasked (0: never).
    pub commit_ns: u64,
    /// `nbd.peer_timeout_s`: how long a peer may answer nothing.
    pub peer_timeout_ns: u64,
    pub storage_cores: bool,
}

impl ServiceArgs {
    fn from(args: &Cmdline<'static>, mode: nvme::Mode) -> ServiceArgs {
        let null = args.get("nbd.null") == Some("1");
        let access =
            match dioxide_service::Access::parse(args.get("nbd.allow"), args.get("nbd.rw_from")) {
                Ok(a) => a,
                Err(e) => fail(EXIT_CONFIG, format_args!("nbd.allow= or nbd.rw_from=: {e}")),
            };
        let stall_ns = match args.number("nbd.stall_s") {
            Ok(v) => v.map_or(nbd::STALL_NS, seconds_ns),
            Err(v) => fail(
                EXIT_CONFIG,
                format_args!("nbd.stall_s={v:?}: expected seconds"),
            ),
        };
        let commit_ns = match args.number("dxfs.commit_s") {
            Ok(Some(0)) => 0,
            Ok(v) => seconds_ns(v.unwrap_or(5)),
            Err(v) => fail(
                EXIT_CONFIG,
                format_args!("dxfs.commit_s={v:?}: expected seconds (0: never)"),
            ),
        };
        let peer_timeout_ns = match args.number("nbd.peer_timeout_s") {
            Ok(v) => v.map_or(nbd::PEER_TIMEOUT_NS, seconds_ns),
            Err(v) => fail(
                EXIT_CONFIG,
                format_args!("nbd.peer_timeout_s={v:?}: expected seconds"),
            ),
        };
        // Default: storage cores with interrupt completion only. A
        // polling storage core spins for the whole device time; under
        // TCG on a host with few cores that time is taken from QEMU's
        // device thread (measured: QD1 file reads 217 IOPS with, 1,210
        // without, at 2 CPUs polled; 1,719 with irq completion; see
        // net/storage.rs).
        let storage_cores = match args.switch("nbd.storage_cores") {
            Ok(v) => v.unwrap_or(mode == nvme::Mode::Irq),
            Err(v) => fail(
                EXIT_CONFIG,
                format_args!("nbd.storage_cores={v:?}: expected 0 or 1"),
            ),
        };
        ServiceArgs {
            null,
            rw: args.get("nbd.rw"),
            access,
            stall_ns,
            commit_ns,
            peer_timeout_ns,
            storage_cores,
        }
    }
}

/// `s` seconds (at least 1, at most a year) in nanoseconds.
fn seconds_ns(s: u64) -> u64 {
    s.clamp(1, 365 * 24 * 3600) * 1_000_000_000
}

/// The virtio-net offloads the arguments ask for (`net.csum=`,
/// `net.guest_csum=`, `net.mrg_rxbuf=`, `net.tso=`: 0 or 1; `net.mtu=`);
/// each is used only where the device offers it (the boot log says).
fn net_offloads(args: &Cmdline) -> dioxide_virtio_net::Wanted {
    let mut w = dioxide_virtio_net::Wanted::default();
    for (key, field) in [
        ("net.csum", &mut w.csum),
        ("net.guest_csum", &mut w.guest_csum),
        ("net.mrg_rxbuf", &mut w.mrg_rxbuf),
        ("net.tso", &mut w.tso),
    ] {
        match args.switch(key) {
            Ok(v) => *field = v.unwrap_or(*field),
            Err(v) => fail(EXIT_CONFIG, format_args!("{key}={v:?}: expected 0 or 1")),
        }
    }
    w.mtu = match args.number("net.mtu") {
        Ok(None) => None,
        Ok(Some(m)) if (576..=65521).contains(&m) => Some(m as u16),
        Ok(Some(m)) => fail(
            EXIT_CONFIG,
            format_args!("net.mtu={m}: expected an MTU from 576 to 65521"),
        ),
        Err(v) => fail(
            EXIT_CONFIG,
            format_args!("net.mtu={v:?}: expected an MTU from 576 to 65521"),
        ),
    };
    w
}

/// The filesystem of the first namespace (`nvme0n1`) if it holds one: the
/// benchmark's and the no-allocation test's.
fn first_fs(
    mounts: &mut alloc::vec::Vec<disk::Mounted>,
) -> Option<dioxide_dxfs::Fs<disk::NvmeDisk>> {
    match mounts.first() {
        Some(m) if m.disk == 0 => Some(mounts.remove(0).fs),
        _ => None,
    }
}

/// The appliance's per-core run loop: reaps NVMe completions and sleeps until
/// the next interrupt. Services (the network server) hook in here. With one
/// network stack per core every serving core runs one of its own.
pub fn run_loop<D: stack::NetPort>(
    mut net: Option<stack::Net<D>>,
    mut server: Option<nbd::Service>,
) -> ! {
    log::info!(
        target: "boot",
        "run loop started on cpu {} ({:?} completion)",
        smp::cpu_index(),
        nvme::mode()
    );
    let mut last = apic::ticks();
    let mut dirty = true;
    // The stack ran since the server last looked at every socket.
    let mut polled = true;
    let mut announced = None;
    let mut quiet_since = time::now_ns();
    loop {
        if let Some(n) = net.as_mut() {
            let t0 = time::rdtsc();
            let first = n.poll_if_needed(dirty);
            polled |= first;
            let t1 = time::rdtsc();
            if let Some(s) = server.as_mut() {
                if smp::cpu_index() == 0 {
                    announce(n, s, &mut announced);
                }
                let reports = s.idle_reports;
                dirty = s.poll(&mut n.sockets, polled);
                if s.idle_reports != reports {
                    report_core(n, s);
                }
                let t2 = time::rdtsc();
                let touched = dirty;
                // Send what the server queued at once.
                polled = n.poll_if_needed(dirty);
                dirty = false;
                s.prof.net += (t1 - t0) + (time::rdtsc() - t2);
                let t = apic::ticks();
                if t / BUSY_REPORT_TICKS != last / BUSY_REPORT_TICKS {
                    s.report_busy(&mut n.sockets, smp::cpu_index());
                }
                last = t;
                // While anything moves, keep polling; a core whose port can
                // wake it sleeps once nothing has for a while.
                let now = time::now_ns();
                if first || touched || polled || s.in_flight() > 0 {
                    quiet_since = now;
                } else if now - quiet_since > QUIET_NS {
                    // Woken by a tick with nothing to do, it sleeps again at
                    // once; a frame or a due timer is activity.
                    sleep_until_frame(n);
                }
                continue;
            }
        }
        // Wake on every interrupt; the APIC tick bounds each sleep.
        nvme::wait_until(|| {
            let now = apic::ticks();
            let woke = now != last;
            last = now;
            woke
        });
    }
}

/// How often (in 10 ms APIC ticks: every 10 s) a serving core that is not
/// idle says what it holds (`nbd: busy:` lines at `log=debug`).
const BUSY_REPORT_TICKS: u64 = 1000;

/// How long a serving core polls with nothing moving (no frame, no socket
/// used, no read in flight) before it sleeps, if its port can wake it.
const QUIET_NS: u64 = 1_000_000;

/// Halts until the port's receive interrupt, any other interrupt or the
/// APIC tick (which bounds every sleep at 10 ms: the stack's timers).
/// Ports without a wake-up interrupt (virtio-net here) return at once: their
/// core keeps polling. In poll mode no NVMe read of this core is in flight
/// (the caller checked), so no completion waits for the poll.
fn sleep_until_frame<D: stack::NetPort>(n: &mut stack::Net<D>) {
    use x86_64::instructions::interrupts;
    interrupts::disable();
    if n.dev.arm_wakeup() {
        if n.dev.has_rx() {
            interrupts::enable();
        } else {
            // sti; hlt: an interrupt between the check and the halt still
            // wakes us.
            interrupts::enable_and_hlt();
        }
        n.dev.disarm_wakeup();
    } else {
        interrupts::enable();
    }
}

/// The run-loop report of a core with a stack of its own (one per core on
/// a multi-queue NIC), after the service's idle report: `nbd: core N: C
/// connections, R requests served, F frames received, T sent since start`.
fn report_core<D: stack::NetPort>(net: &stack::Net<D>, server: &nbd::Service) {
    if let Some((rx, tx)) = net.dev.frames() {
        log::info!(
            target: "nbd",
            "core {}: {} connections, {} requests served, {rx} frames received, {tx} sent since start",
            smp::cpu_index(),
            server.connections(),
            server.served()
        );
    }
}

/// Tells the person at the server's screen where to connect: `serving N
/// exports at nbd://ADDRESS:PORT/` once the stack has its address (static,
/// or DHCP's lease), and again whenever it changes (a new lease, or the
/// same one taken again after it was lost). `announced` is the address last
/// said.
fn announce<D: stack::NetPort>(
    net: &stack::Net<D>,
    server: &nbd::Service,
    announced: &mut Option<smoltcp::wire::Ipv4Address>,
) {
    let addr = if net.configured {
        net.iface.ipv4_addr()
    } else {
        None
    };
    if addr == *announced {
        return;
    }
    *announced = addr;
    if let Some(a) = addr {
        log::info!(
            target: "nbd",
            "serving {} exports at nbd://{a}:{}/",
            server.table().len(),
            dioxide_service::PORT
        );
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    serial::emergency(format_args!("\nPANIC: {info}\n  on {}\n", smp::Here));
    power::fatal(power::EXIT_PANIC)
}
