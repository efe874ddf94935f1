/*
 * block.c - the lguest block driver (drivers/block/lguest_blk.c, 2.6.23).
 *
 * The device's page is a struct lguest_block_page shared with the Launcher:
 * we write the request (type, sector, bytes), the Launcher writes the result
 * and, once, the disk size (num_sectors).  Data moves by DMA to the page's
 * own physical address, a private key, so it goes to our Launcher:
 *  - at start-up we bind one "reply" lguest_dma at that key;
 *  - a write sends the data there; the Launcher writes it out;
 *  - a read points the bound reply entry at our buffer and sends an empty
 *    DMA as a ping; the Launcher reads the disk into the reply entry.
 * Either way the Launcher then sets result (1 done, 2 error) and interrupts.
 */
#include "kernel.h"

static volatile struct lguest_block_page *page;
static u32 page_pa;
static struct lguest_dma reply, request;

static void block_irq(unsigned int irq)
{
	(void)irq;	/* the result is in the page; waking up is enough */
}

u32 block_sectors(void)
{
	return page ? page->num_sectors : 0;
}

int block_init(void)
{
	unsigned int index;
	struct lguest_device_desc *desc = find_device(LGUEST_DEVICE_T_BLOCK, 0, &index);

	if (!desc)
		return 0;
	if (desc->num_pages < 1) {
		desc->status |= LGUEST_DEVICE_S_FAILED;
		return 0;
	}
	page = device_map(desc);
	page_pa = desc->pfn * PAGE_SIZE;
	request_irq(index + 1, block_irq);
	if (!hcall(LHCALL_BIND_DMA, page_pa, __pa(&reply), (1 << BIND_NUM_SHIFT) | (index + 1))) {
		printk("block: could not bind the reply buffer\n");
		desc->status |= LGUEST_DEVICE_S_FAILED;
		page = NULL;
		return 0;
	}
	device_ready(desc);
	printk("block: %u sectors (%u KiB)\n", page->num_sectors, page->num_sectors / 2);
	return 1;
}

/* Describe buf as DMA pieces, cut at page boundaries as the Host requires. */
static void fill_dma(struct lguest_dma *dma, void *buf, u32 bytes)
{
	u32 pa = __pa(buf);
	unsigned int i;

	memset(dma, 0, sizeof(*dma));
	for (i = 0; bytes && i < LGUEST_MAX_DMA_SECTIONS; i++) {
		u32 room = PAGE_SIZE - (pa % PAGE_SIZE);
		u32 n = bytes < room ? bytes : room;

		dma->addr[i] = pa;
		dma->len[i] = n;
		pa += n;
		bytes -= n;
	}
}

static int block_done(void)
{
	return page->result != BLOCK_RESULT_PENDING;
}

/* One request, waited for; 0 on success. */
int block_io(int write, u32 sector, void *buf, u32 bytes)
{
	if (!page)
		return -1;
	page->type = write ? BLOCK_TYPE_WRITE : BLOCK_TYPE_READ;
	page->sector = sector;
	page->bytes = bytes;
	page->result = BLOCK_RESULT_PENDING;
	if (write) {
		fill_dma(&request, buf, bytes);
		fill_dma(&reply, buf, 0);	/* no data comes back */
	} else {
		fill_dma(&request, buf, 0);	/* an empty "ping" */
		fill_dma(&reply, buf, bytes);
	}
	barrier();
	hcall(LHCALL_SEND_DMA, page_pa, __pa(&request), 0);
	wait_until(~0ULL, block_done);
	return page->result == BLOCK_RESULT_DONE ? 0 : -1;
}
