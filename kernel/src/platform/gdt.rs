//! The kernel's GDT and TSS. The TSS provides separate stacks (IST) for double
//! faults, NMIs and machine checks, so that an exception on a broken stack is
//! still reported instead of triple-faulting.

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

static mut IST_STACKS: [Stack; 3] = [const { Stack([0; IST_STACK]) }; 3];

static TSS: Once<TaskStateSegment> = Once::new();
static GDT: Once<(
    GlobalDescriptorTable,
    SegmentSelector,
    SegmentSelector,
    SegmentSelector,
)> = Once::new();

pub fn init() {
    let tss = TSS.call_once(|| {
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
    let (gdt, code, data, tss_sel) = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss_sel = gdt.append(Descriptor::tss_segment(tss));
        (gdt, code, data, tss_sel)
    });
    gdt.load();
    // SAFETY: the selectors index the GDT just loaded, with matching types.
    unsafe {
        CS::set_reg(*code);
        DS::set_reg(*data);
        ES::set_reg(*data);
        SS::set_reg(*data);
        load_tss(*tss_sel);
    }
}
