//! The GDT and TSS, one pair per CPU. The TSS provides separate stacks
//! (IST) for double faults, NMIs and machine checks, so that an exception
//! on a broken stack is still reported instead of triple-faulting.
//!
//! Each CPU has its own TSS (a TSS is marked busy in the GDT that loads it,
//! and its IST stacks must not be shared: two CPUs taking an NMI at once
//! would run on the same stack) and so its own GDT. The boot CPU's live in
//! statics ([`init`], before there is a heap); an application processor's
//! are allocated by [`CpuTables::new`] and loaded by [`CpuTables::load`].
//! Every GDT is built in the same order, so the selectors are the same on
//! every CPU — which is what lets one IDT serve them all (its gates name
//! the code selector).

use alloc::alloc::{alloc_zeroed, Layout};
use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

/// IST index (1-based in the IDT entry) of the double-fault stack.
pub const IST_DOUBLE_FAULT: u8 = 1;
pub const IST_NMI: u8 = 2;
pub const IST_MACHINE_CHECK: u8 = 3;

const IST_STACK: usize = 16 * 1024;

#[repr(align(16))]
#[allow(dead_code)] // memory the CPU uses, never read by Rust
struct Stack([u8; IST_STACK]);

/// The boot CPU's IST stacks.
static mut IST_STACKS: [Stack; 3] = [const { Stack([0; IST_STACK]) }; 3];

/// One CPU's descriptor tables: the GDT (null, kernel code, kernel data,
/// the TSS) and the TSS it points to.
pub struct CpuTables {
    gdt: GlobalDescriptorTable,
    code: SegmentSelector,
    data: SegmentSelector,
    tss_sel: SegmentSelector,
    tss: &'static TaskStateSegment,
}

impl CpuTables {
    fn build(tss: &'static TaskStateSegment) -> CpuTables {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss_sel = gdt.append(Descriptor::tss_segment(tss));
        CpuTables {
            gdt,
            code,
            data,
            tss_sel,
            tss,
        }
    }

    /// Tables for an application processor: a TSS with three IST stacks of
    /// its own and a GDT, on the heap, for good (a CPU never gives its
    /// tables back). `None` when the heap is out of memory.
    pub fn new() -> Option<&'static CpuTables> {
        let layout = Layout::from_size_align(IST_STACK, 16).ok()?;
        let mut tss = TaskStateSegment::new();
        // (indexed: the TSS is packed, its fields cannot be borrowed)
        #[allow(clippy::needless_range_loop)]
        for i in 0..3 {
            // SAFETY: a non-zero size; the memory is never freed (leaked
            // for the CPU's IST).
            let p = unsafe { alloc_zeroed(layout) };
            if p.is_null() {
                return None;
            }
            tss.interrupt_stack_table[i] = VirtAddr::from_ptr(p) + IST_STACK as u64;
        }
        let tss: &'static TaskStateSegment = alloc::boxed::Box::leak(alloc::boxed::Box::new(tss));
        Some(alloc::boxed::Box::leak(alloc::boxed::Box::new(
            CpuTables::build(tss),
        )))
    }

    /// Loads these tables on the calling CPU: GDT, segment registers, TR.
    /// Each `CpuTables` must be loaded by one CPU only (loading marks its
    /// TSS busy).
    pub fn load(&'static self) {
        self.gdt.load();
        // SAFETY: the selectors index the GDT just loaded, with matching
        // types; the TSS descriptor is not busy (these tables are loaded
        // once, by their CPU).
        unsafe {
            CS::set_reg(self.code);
            DS::set_reg(self.data);
            ES::set_reg(self.data);
            SS::set_reg(self.data);
            load_tss(self.tss_sel);
        }
    }

    /// The address of this CPU's TSS.
    pub fn tss_addr(&self) -> u64 {
        self.tss as *const TaskStateSegment as u64
    }
}

static BSP_TSS: Once<TaskStateSegment> = Once::new();
static BSP_TABLES: Once<CpuTables> = Once::new();

/// Loads the boot CPU's GDT and TSS (static; no heap needed).
pub fn init() {
    let tss = BSP_TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        // (indexed: the TSS is packed, its fields cannot be borrowed)
        #[allow(clippy::needless_range_loop)]
        for i in 0..3 {
            // SAFETY: only the address of the static stacks is taken; the CPU
            // uses them on the IST switches configured here.
            let top = unsafe {
                VirtAddr::from_ptr(core::ptr::addr_of!(IST_STACKS[i])) + IST_STACK as u64
            };
            tss.interrupt_stack_table[i] = top;
        }
        tss
    });
    BSP_TABLES.call_once(|| CpuTables::build(tss)).load();
}

/// The base address of the TSS the calling CPU has loaded (read back from
/// its GDTR and TR: what the CPU uses, not what the kernel meant it to).
pub fn current_tss() -> u64 {
    let gdtr = x86_64::instructions::tables::sgdt();
    let tr: u16;
    // SAFETY: STR only reads the task register's selector.
    unsafe { core::arch::asm!("str {0:x}", out(reg) tr, options(nomem, nostack, preserves_flags)) };
    let at = gdtr.base.as_u64() + (tr & !7) as u64;
    // SAFETY: TR indexes a 16-byte TSS descriptor inside the loaded GDT
    // (every GDT here has one, loaded by `CpuTables::load`); GDTs live for
    // good and are identity mapped. Reads only.
    let (lo, hi) = unsafe {
        (
            core::ptr::read_volatile(at as *const u64),
            core::ptr::read_volatile((at + 8) as *const u64),
        )
    };
    // Base 15:0 in bits 31:16, 23:16 in 39:32, 31:24 in 63:56; 63:32 in the
    // second quadword's low half.
    ((lo >> 16) & 0xff_ffff) | ((lo >> 56) << 24) | ((hi & 0xffff_ffff) << 32)
}
