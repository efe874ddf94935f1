/*
 * hcall.c - talking to the Host: lguest_data, interrupts, the timer, time.
 *
 * A Guest kernel under lguest runs in ring 1 and cannot do the privileged
 * things a kernel does (load an IDT, disable interrupts, program a timer,
 * halt).  It asks the Host instead, with hypercalls, and it shares one
 * structure with the Host, struct lguest_data, for what must be cheap:
 * the interrupt flag, the time, and the async hypercall ring.
 */
#include "kernel.h"

/* Linux 2.6.23 wrote ACCESS_ONCE for a value someone else may change. */
#define ACCESS_ONCE(x) (*(volatile __typeof__(x) *)&(x))

/*
 * The structure the Host reads at LGUEST_INIT.  Two things must be right
 * before that hypercall, because the Host reads them then: the async ring
 * must be empty (status 0xFF everywhere) and the no-interrupt window must name
 * the end of our interrupt return (head.S).
 */
struct lguest_data lguest_data __attribute__((aligned(PAGE_SIZE))) = {
	.hcall_status = { [0 ... LHCALL_RING_SIZE - 1] = HCALL_STATUS_EMPTY },
	.noirq_start = (u32)lguest_noirq_start,
	.noirq_end = (u32)lguest_noirq_end,
};

_Static_assert(offsetof(struct lguest_data, tv_sec) == LGUEST_DATA_TIME, "time");
_Static_assert(offsetof(struct lguest_data, hcall_status) == LGUEST_DATA_HCALL_STATUS,
	       "hcall_status");
_Static_assert(offsetof(struct lguest_data, hcalls) == LGUEST_DATA_HCALLS, "hcalls");
_Static_assert(offsetof(struct lguest_data, guestid) == LGUEST_DATA_GUESTID, "guestid");
_Static_assert(offsetof(struct lguest_data, noirq_start) == LGUEST_DATA_NOIRQ_START,
	       "noirq_start");
_Static_assert(sizeof(struct lguest_data) == LGUEST_DATA_SIZE, "lguest_data size");
_Static_assert(sizeof(struct lguest_dma) == LGUEST_DMA_SIZE, "lguest_dma size");
_Static_assert(sizeof(struct lguest_device_desc) == LGUEST_DEVICE_DESC_SIZE, "desc size");

/* The first hypercall must be LGUEST_INIT, with the PHYSICAL address. */
void lguest_init(void)
{
	hcall(LHCALL_LGUEST_INIT, __pa(&lguest_data), 0, 0);
}

/*
 * The async ring (lguest's async_hcall).  A call queued here is made by the
 * Host, in order, at our next hypercall or the next time the Host has control
 * anyway: a transmit followed by a HALT costs one trip to the Host, not two.
 * Entries are taken in turn and the Host marks each one done (status back to
 * 0xFF); if the next one is still queued the ring is full, and the call is
 * made at once, which drains the ring first -- what lguest's Guest did.
 * Interrupts must be off.  Returns the entry taken, or ASYNC_MADE.
 */
int async_hcall(u32 call, u32 arg1, u32 arg2, u32 arg3)
{
	static unsigned int next;
	unsigned int n = next;

	if (ACCESS_ONCE(lguest_data.hcall_status[n]) != HCALL_STATUS_EMPTY) {
		hcall(call, arg1, arg2, arg3);
		return ASYNC_MADE;
	}
	lguest_data.hcalls[n].eax = call;
	lguest_data.hcalls[n].edx = arg1;
	lguest_data.hcalls[n].ebx = arg2;
	lguest_data.hcalls[n].ecx = arg3;
	barrier();		/* the arguments before the status that says "go" */
	ACCESS_ONCE(lguest_data.hcall_status[n]) = 0;
	next = (n + 1) % LHCALL_RING_SIZE;
	return n;
}

/* Has the Host made the call async_hcall() queued in entry n? */
int async_done(int n)
{
	return n == ASYNC_MADE || ACCESS_ONCE(lguest_data.hcall_status[n]) == HCALL_STATUS_EMPTY;
}

/* Have the Host make every queued call now. */
void async_flush(void)
{
	hcall(LHCALL_FLUSH_ASYNC, 0, 0, 0);
}

/* Interrupts on and off: just a flag the Host looks at before it interrupts. */
u32 irq_save(void)
{
	u32 flags = ACCESS_ONCE(lguest_data.irq_enabled);

	ACCESS_ONCE(lguest_data.irq_enabled) = 0;
	barrier();
	return flags;
}

void irq_restore(u32 flags)
{
	barrier();
	ACCESS_ONCE(lguest_data.irq_enabled) = flags;
}

void irq_enable(void)
{
	irq_restore(IRQ_ENABLED_ON);
}

/*
 * The IDT.  We cannot load one (lidt is privileged): we hand the Host one
 * entry at a time, as the two 32-bit words of an i386 gate descriptor.  Ours
 * are 32-bit interrupt gates (type 0xE, so the Host clears irq_enabled on
 * delivery) for the kernel code segment, present, privilege GUEST_PL.
 */
#define GATE_PRESENT 0x8000
#define GATE_INTERRUPT_32 0x0E00
#define GATE_DPL(pl) ((pl) << 13)

static void load_idt_entry(unsigned int vector, u32 handler)
{
	u32 lo = ((u32)LGUEST_KERNEL_CS << 16) | (handler & 0xFFFF);
	u32 hi = (handler & 0xFFFF0000) | GATE_PRESENT | GATE_DPL(GUEST_PL)
		 | GATE_INTERRUPT_32;

	hcall(LHCALL_LOAD_IDT_ENTRY, vector, lo, hi);
}

void idt_init(void)
{
	unsigned int v;

	for (v = 0; v < ARRAY_SIZE(irq_stubs); v++) {
		/* lguest's Host never lets a Guest handle NMI (2), double
		 * fault (8), vector 15 or its own hypercall trap: it ignores
		 * such entries, so we do not send them. */
		if (v == 2 || v == 8 || v == 15 || v == LGUEST_TRAP_ENTRY)
			continue;
		load_idt_entry(v, irq_stubs[v]);
	}
}

static irq_handler_t handlers[LGUEST_IRQS];

void request_irq(unsigned int irq, irq_handler_t handler)
{
	if (irq < LGUEST_IRQS)
		handlers[irq] = handler;
}

static const char *const trap_names[] = {
	"divide error", "debug", "NMI", "int3", "overflow", "bounds",
	"invalid opcode", "device not available", "double fault",
	"coprocessor overrun", "invalid TSS", "segment not present",
	"stack segment", "general protection", "page fault",
};

/* A trap in the kernel is a bug (or a hostile=fault test): oops and crash,
 * which is what Linux under lguest did too (panic ends in a CRASH hypercall). */
static void __attribute__((noreturn)) oops(struct irq_frame *f)
{
	static char msg[CRASH_MESSAGE_MAX];
	const char *name = f->vector < ARRAY_SIZE(trap_names)
			   ? trap_names[f->vector] : "trap";

	snprintf(msg, sizeof(msg), "Oops: %s (trap %u) at eip %#x, error %#x, cr2 %#x",
		 name, f->vector, f->eip, f->error, lguest_data.cr2);
	printk("%s\n", msg);
	crash(msg);
}

/* Called by every stub in head.S, with interrupts off (an interrupt gate). */
void do_irq(struct irq_frame *frame)
{
	unsigned int irq;

	if (frame->vector < FIRST_EXTERNAL_VECTOR)
		oops(frame);
	irq = frame->vector - FIRST_EXTERNAL_VECTOR;
	if (handlers[irq])
		handlers[irq](irq);
}

/*
 * The clock.  SET_CLOCKEVENT is a one-shot timer in nanoseconds (0 cancels):
 * the Host raises irq 0 when it expires.  Our timer interrupt only wakes us
 * (whoever waits reads the time and decides) and notes that nothing is armed.
 *
 * Each arming is a trip to the Host, and a waiter arms before every HALT, so
 * we arm only for a deadline earlier than the one already armed: that is what
 * Linux's clockevents did (tick_program_event reprograms the device only for
 * an earlier event).  A later deadline is met by waking at the armed one and
 * arming again then.  "timer_armed" may only ever claim less than the Host
 * has: if it is stale it is ~0 (we arm once more), never a deadline the Host
 * has forgotten.
 */
static u64 timer_armed = ~0ULL;		/* ns, as now_ns(); ~0: nothing armed */

static void timer_irq(unsigned int irq)
{
	(void)irq;
	timer_armed = ~0ULL;
}

/* Make sure the timer fires by "deadline", which is after "now" (interrupts
 * off).  ~0, "no deadline", is never earlier than what is armed. */
static void arm_timer_by(u64 deadline, u64 now)
{
	u64 delta = deadline - now;

	if (deadline >= timer_armed)
		return;
	if (delta > 0xFFFFFFFFu)	/* the Host takes a u32: wake early, arm again */
		delta = 0xFFFFFFFFu;
	timer_armed = now + delta;
	hcall(LHCALL_SET_CLOCKEVENT, (u32)delta, 0, 0);
}

/* The Host keeps lguest_data.time current whenever we resume; it may change
 * between our two reads, so read the seconds again to be sure. */
u64 now_ns(void)
{
	u32 sec, nsec;

	do {
		sec = ACCESS_ONCE(lguest_data.tv_sec);
		nsec = ACCESS_ONCE(lguest_data.tv_nsec);
	} while (sec != ACCESS_ONCE(lguest_data.tv_sec));
	return (u64)sec * NSEC_PER_SEC + nsec;
}

/*
 * Sleep until "deadline" (ns, as now_ns()) or until done() says so.  done()
 * is asked with interrupts off, so nothing can slip in between its answer
 * and our HALT (lguest_halt enables interrupts and halts in one step).
 * Frames that arrived while interrupts were off are taken first (net_poll).
 */
void wait_until(u64 deadline, int (*done)(void))
{
	static int timer_ready;
	u64 now;

	if (!timer_ready) {
		request_irq(TIMER_IRQ, timer_irq);
		timer_ready = 1;
	}
	for (;;) {
		irq_save();
		net_poll();
		now = now_ns();
		if ((done && done()) || now >= deadline)
			break;
		arm_timer_by(deadline, now);
		lguest_halt();
	}
	irq_enable();
}

/* The end: the Host kills us with "CRASH: msg" and never runs us again. */
void crash(const char *msg)
{
	for (;;)
		hcall(LHCALL_CRASH, __pa(msg), 0, 0);
}
