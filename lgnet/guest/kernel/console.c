/*
 * console.c - the lguest console: output and input over DMA key 0.
 *
 * Output needs no device at all: we SEND_DMA to LGUEST_CONSOLE_DMA_KEY (0).
 * Key 0 is a private key (no net page is there), so the Host hands the DMA to
 * our own Launcher, which writes it to its stdout and fills in used_len
 * before we run again.  That is why we can print before we have looked at
 * the device descriptors, and why "lguest: booting" comes so early.
 *
 * Input: we bind one 256-byte buffer at key 0 with the console device's irq;
 * the Launcher fills it and raises the interrupt.  We echo what we get.
 */
#include "kernel.h"

/* DMA pieces may not cross a page: a page-aligned page of text never does. */
static char outbuf[PAGE_SIZE] __attribute__((aligned(PAGE_SIZE)));
static struct lguest_dma out_dma;

void console_write(const char *s, unsigned int len)
{
	u32 flags = irq_save();	/* outbuf is shared with interrupt handlers */

	while (len) {
		unsigned int n = len < PAGE_SIZE ? len : PAGE_SIZE;

		memcpy(outbuf, s, n);
		out_dma.used_len = 0;
		out_dma.addr[0] = __pa(outbuf);
		out_dma.len[0] = n;
		out_dma.len[1] = 0;
		hcall(LHCALL_SEND_DMA, LGUEST_CONSOLE_DMA_KEY, __pa(&out_dma), 0);
		s += n;
		len -= n;
	}
	irq_restore(flags);
}

static char inbuf[CONSOLE_INPUT_BYTES] __attribute__((aligned(CONSOLE_INPUT_BYTES)));
static struct lguest_dma in_dma;

static void console_irq(unsigned int irq)
{
	unsigned int i, len = in_dma.used_len;

	(void)irq;
	if (len > CONSOLE_INPUT_BYTES)
		len = CONSOLE_INPUT_BYTES;
	/* The terminal is raw: Enter arrives as '\r'. */
	for (i = 0; i < len; i++) {
		console_write(&inbuf[i], 1);
		if (inbuf[i] == '\r')
			console_write("\n", 1);
	}
	barrier();
	in_dma.used_len = 0;	/* give the buffer back */
}

void console_init(void)
{
	unsigned int index;
	struct lguest_device_desc *desc = find_device(LGUEST_DEVICE_T_CONSOLE, 0, &index);

	if (!desc)
		return;
	in_dma.used_len = 0;
	in_dma.addr[0] = __pa(inbuf);
	in_dma.len[0] = CONSOLE_INPUT_BYTES;
	request_irq(index + 1, console_irq);
	if (!hcall(LHCALL_BIND_DMA, LGUEST_CONSOLE_DMA_KEY, __pa(&in_dma),
		   (1 << BIND_NUM_SHIFT) | (index + 1))) {
		printk("console: could not bind the input buffer\n");
		desc->status |= LGUEST_DEVICE_S_FAILED;
		return;
	}
	device_ready(desc);
}
