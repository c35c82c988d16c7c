// Boot entry of the dioxide kernel (assembled by LLVM through global_asm!,
// Intel syntax).
//
// Two ways in, both in 32-bit protected mode with paging off:
//   _start     multiboot2 (GRUB): EAX = 0x36d76289, EBX = boot information
//   pvh_start  PVH (QEMU -kernel, Xen): EBX = hvm_start_info
// Both zero .bss, build identity page tables for the first 4 GiB (2 MiB pages),
// enable PAE, long mode and SSE, load a 64-bit GDT and call
// dioxide_boot_entry(protocol, magic, info) on the boot stack.

.set MB2_MAGIC, 0xe85250d6
.set MB2_ARCH_I386, 0

.section .multiboot2, "a"
.balign 8
mb2_header:
    .long MB2_MAGIC
    .long MB2_ARCH_I386
    .long mb2_header_end - mb2_header
    .long 0x100000000 - (MB2_MAGIC + MB2_ARCH_I386 + (mb2_header_end - mb2_header))
    // Framebuffer request (type 5: u16 type, u16 flags, u32 size 20, u32
    // width, height, depth), flags 1 = optional: GRUB boots us in text
    // mode when it cannot set a mode. Without the tag, GRUB under SeaBIOS
    // hands over EGA text (type 2 at 0xb8000, 80x25), and OVMF keeps its
    // 800x600x24 mode. With 1024x768x32, GRUB 2.06 tries
    // "1024x768x32,1024x768,auto": under SeaBIOS the VBE mode (RGB at
    // 0xfd000000, pitch 4096), under OVMF the GOP mode of that size (at
    // 0xc0000000; grub.cfg needs `insmod all_video`). 0x0x0 ("no
    // preference") would leave the choice to GRUB's "auto", which differs
    // between machines. The tag sets GRUB's gfxpayload; a `set
    // gfxpayload=...` after the multiboot2 command in grub.cfg overrides
    // it (e.g. `text`, or 800x600x24). The console draws in any of them.
    .balign 8
    .short 5
    .short 1
    .long 20
    .long 1024
    .long 768
    .long 32
    // end tag
    .balign 8
    .short 0
    .short 0
    .long 8
mb2_header_end:

// XEN_ELFNOTE_PHYS32_ENTRY (18): physical address of the 32-bit PVH entry.
// QEMU reads the descriptor as a 64-bit value when the ELF is 64-bit.
.section .note.Xen, "a", @note
.balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_start

.section .text.boot, "ax"
.code32
.global _start
_start:
    cli
    cld
    mov ebp, 2
    mov edx, eax
    jmp boot32

.global pvh_start
pvh_start:
    cli
    cld
    mov ebp, 1
    xor edx, edx

boot32:
    // Zero .bss (holds the stack and page tables); EBX, EDX, EBP survive.
    mov edi, offset __bss_start
    mov ecx, offset __bss_end
    sub ecx, edi
    xor eax, eax
    rep stosb
    mov dword ptr [boot_protocol], ebp
    mov dword ptr [boot_magic], edx
    mov dword ptr [boot_info_addr], ebx
    mov esp, offset boot_stack_top

    // Long mode available? CPUID 0x80000001 EDX bit 29.
    mov eax, 0x80000000
    cpuid
    cmp eax, 0x80000001
    jb no_long_mode
    mov eax, 0x80000001
    cpuid
    test edx, 1 << 29
    jz no_long_mode

    // PML4[0] -> PDPT; PDPT[0..4] -> PD0..PD3; PDn: 512 x 2 MiB each.
    mov eax, offset boot_pdpt
    or eax, 3
    mov dword ptr [boot_pml4], eax
    mov edi, offset boot_pdpt
    mov eax, offset boot_pd
    or eax, 3
    mov ecx, 4
1:
    mov dword ptr [edi], eax
    add eax, 4096
    add edi, 8
    loop 1b
    mov edi, offset boot_pd
    mov eax, 0x83
    mov ecx, 2048
2:
    mov dword ptr [edi], eax
    add eax, 0x200000
    add edi, 8
    loop 2b

    // CR4: PAE (5), OSFXSR (9), OSXMMEXCPT (10).
    mov eax, cr4
    or eax, (1 << 5) | (1 << 9) | (1 << 10)
    mov cr4, eax
    mov eax, offset boot_pml4
    mov cr3, eax
    // EFER.LME
    mov ecx, 0xc0000080
    rdmsr
    or eax, 1 << 8
    wrmsr
    // CR0: PG, WP, NE, MP, PE; clear EM and CD/NW.
    mov eax, cr0
    and eax, ~((1 << 2) | (1 << 29) | (1 << 30))
    or eax, (1 << 31) | (1 << 16) | (1 << 5) | (1 << 1) | 1
    mov cr0, eax

    lgdt [boot_gdt_ptr]
    // Far return into the 64-bit code segment (selector 0x08).
    mov eax, offset long_mode_start
    push 0x08
    push eax
    retf

no_long_mode:
    mov esi, offset msg_no_long_mode
    mov dx, 0x3f8
3:
    lodsb
    test al, al
    jz 4f
    out dx, al
    jmp 3b
4:
    hlt
    jmp 4b

.code64
long_mode_start:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    lea rsp, [rip + boot_stack_top]
    xor ebp, ebp
    mov edi, dword ptr [rip + boot_protocol]
    mov esi, dword ptr [rip + boot_magic]
    mov edx, dword ptr [rip + boot_info_addr]
    call dioxide_boot_entry
5:
    cli
    hlt
    jmp 5b

.section .rodata.boot, "a"
.balign 8
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
boot_gdt_end:
boot_gdt_ptr:
    .short boot_gdt_end - boot_gdt - 1
    .long boot_gdt
msg_no_long_mode:
    .asciz "dioxide: this CPU has no long mode (x86_64); halting\r\n"

.section .bss.boot, "aw", @nobits
.balign 4096
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4 * 4096
.global boot_stack_bottom
boot_stack_bottom:
    .skip 256 * 1024
.global boot_stack_top
boot_stack_top:
boot_protocol:
    .skip 4
boot_magic:
    .skip 4
boot_info_addr:
    .skip 4
