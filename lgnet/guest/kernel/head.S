/*
 * head.S - where the Launcher jumps in, and how interrupts come and go.
 *
 * Three things must be in assembly:
 *  - the entry point, found by the Launcher as "just after the GenuineLguest
 *    magic" (plus page_offset).  It arrives with paging on (the Launcher's
 *    linear page tables map all RAM at PAGE_OFFSET), %esi = the physical
 *    address of the boot header, no stack, in ring 1;
 *  - one small stub per vector, giving C a uniform struct irq_frame;
 *  - the interrupt return.  The Guest cannot use "sti"/"cli" (ring 1): its
 *    interrupt flag is lguest_data.irq_enabled.  Returning from an interrupt
 *    must restore that flag from the saved eflags and then "iret", and the
 *    Host must not interrupt us in between (we would push a second frame on
 *    top of a half-returned one).  lguest's answer: the Guest tells the Host
 *    the bounds of that code (noirq_start/noirq_end in lguest_data) and the
 *    Host never delivers an interrupt while EIP is inside.
 */
#include "lguest.h"

/* The magic must be the first thing in the image: the Launcher takes the first
 * match, so no other copy of the string may come before it. */
	.section .text.head, "ax"
	.ascii "GenuineLguest"
	.globl lguest_entry
lguest_entry:
	movl	$boot_stack_top, %esp
	pushl	%esi			/* start_kernel(boot header, physical) */
	call	start_kernel
1:	jmp	1b			/* start_kernel never returns */

/*
 * One stub per vector: 0-31 are the CPU's traps, 32 + n is irq n (this is
 * where the Host delivers irq n, FIRST_EXTERNAL_VECTOR in lguest).  Traps
 * 8, 10-14 and 17 push an error code; the others get a 0 so that every frame
 * looks the same.  The stubs' addresses go in irq_stubs[] for idt_init().
 */
	.section .rodata
	.globl	irq_stubs
	.balign	4
irq_stubs:

	.text
vector = 0
.rept FIRST_EXTERNAL_VECTOR + LGUEST_IRQS
	.pushsection .rodata
	.long	1f
	.popsection
1:
	.if (vector == 8) || ((vector >= 10) && (vector <= 14)) || (vector == 17)
	.else
	pushl	$0
	.endif
	pushl	$vector
	jmp	irq_common
vector = vector + 1
.endr

irq_common:
	pushal
	cld
	pushl	%esp			/* do_irq(struct irq_frame *) */
	call	do_irq
	addl	$4, %esp
	popal
	addl	$8, %esp		/* vector and error code */

/*
 * The interrupt return.  Stack: eip, cs, eflags.  The Host pushed eflags with
 * IF equal to irq_enabled at the time of the interrupt, so restoring
 * irq_enabled from it re-enables interrupts exactly when they were enabled.
 */
	pushl	%eax
	movl	12(%esp), %eax		/* the saved eflags */
	andl	$IRQ_ENABLED_ON, %eax
	.globl	lguest_noirq_start
lguest_noirq_start:
	movl	%eax, lguest_data + LGUEST_DATA_IRQ_ENABLED
	popl	%eax
	iret

/*
 * lguest_halt(): enable interrupts and sleep until one is pending.  If we
 * enabled interrupts first and then made the HALT hypercall, an interrupt
 * could arrive in between, run its handler (which might have been the very
 * event we are waiting for) and leave us halting with nothing to wake us.
 * So the enable and the "int" sit inside the same no-interrupt window: the
 * Host can only interrupt us once EIP is past the "int", at lguest_noirq_end.
 * (Linux 2.6.23 instead halted with interrupts off, relying on the Host to
 * force them on when it wakes a halted Guest; this works either way.)
 */
halt_tail:
	movl	$IRQ_ENABLED_ON, lguest_data + LGUEST_DATA_IRQ_ENABLED
	int	$LGUEST_TRAP_ENTRY
	.globl	lguest_noirq_end
lguest_noirq_end:
	ret

	.globl	lguest_halt
lguest_halt:
	movl	$LHCALL_HALT, %eax
	jmp	halt_tail

	.section .bss
	.balign	16
boot_stack:
	.skip	16384
boot_stack_top:

/* No executable stack, please. */
	.section .note.GNU-stack, "", @progbits
