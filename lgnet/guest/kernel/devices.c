/*
 * devices.c - finding our devices and mapping their pages.
 *
 * The Launcher describes our devices in an array of 12-byte descriptors in
 * the page just above RAM (guest-physical "mem"); each device's own pages sit
 * at pfn * PAGE_SIZE, handed out downward from LGUEST_GUEST_TOP.  Neither is
 * RAM, so the Launcher's linear mapping (all RAM at PAGE_OFFSET) does not
 * reach them, and a ring-1 Guest cannot read %cr3 to find its page tables.
 *
 * What we do: the Launcher put its page directory one page below the initrd
 * (mem - initrd size - PAGE_SIZE), and the boot header tells us both numbers,
 * so we know where it is.  We hook one page table of our own (in our BSS)
 * into it for the 4 MiB at DEVICE_WINDOW (0xF0000000) and fill it in:
 *
 *   0xF0000000                      the descriptor page
 *   0xF0001000, 0xF0002000, ...     each device's pages, in descriptor order
 *
 * Every change is reported to the Host as lguest 2.6.23's Guest did for its
 * ioremap(): SET_PMD for the directory entry, SET_PTE for each page-table
 * entry, then FLUSH_TLB of the kernel mappings.
 */
#include "kernel.h"

u32 ram_size;

static u32 pgdir_pa;
static u32 window[PTES_PER_PAGE] __attribute__((aligned(PAGE_SIZE)));
static unsigned int window_used;
static struct lguest_device_desc *descs;

#define MAX_DEVICES (PAGE_SIZE / LGUEST_DEVICE_DESC_SIZE)

static void *map_pages(u32 pa, unsigned int pages)
{
	u32 va = DEVICE_WINDOW + window_used * PAGE_SIZE;
	unsigned int i;

	if (window_used + pages > PTES_PER_PAGE)
		crash("device pages do not fit the device window");
	for (i = 0; i < pages; i++) {
		u32 pte = (pa + i * PAGE_SIZE) | PAGE_PRESENT;

		window[window_used + i] = pte;
		hcall(LHCALL_SET_PTE, pgdir_pa, va + i * PAGE_SIZE, pte);
	}
	window_used += pages;
	hcall(LHCALL_FLUSH_TLB, 1, 0, 0);
	return (void *)va;
}

static const char *const type_names[] = { "none", "console", "net", "block" };

void devices_init(u32 pgdir)
{
	u32 *pgd = __va(pgdir);
	unsigned int i, index = DEVICE_WINDOW >> PGDIR_SHIFT;

	/* The Launcher's directory maps RAM at PAGE_OFFSET: if that entry is
	 * not present, our idea of where the directory is must be wrong. */
	if (!(pgd[PAGE_OFFSET >> PGDIR_SHIFT] & 1))
		crash("cannot find the Launcher's page directory");
	pgdir_pa = pgdir;
	pgd[index] = __pa(window) | PAGE_PRESENT;
	hcall(LHCALL_SET_PMD, pgdir_pa, index, 0);

	descs = map_pages(ram_size, 1);
	for (i = 0; i < MAX_DEVICES; i++) {
		u16 type = descs[i].type;

		if (type == LGUEST_DEVICE_T_NONE)
			continue;
		/* lguest_bus: acknowledge every device we see. */
		descs[i].status |= LGUEST_DEVICE_S_ACKNOWLEDGE;
		printk("lguest: device %u: %s, features %#x, %u page(s) at %#x, irq %u\n",
		       i, type < ARRAY_SIZE(type_names) ? type_names[type] : "unknown",
		       descs[i].features, descs[i].num_pages,
		       descs[i].pfn * PAGE_SIZE, i + 1);
	}
}

/* The nth device of a type; its index in the array gives its irq (index + 1). */
struct lguest_device_desc *find_device(u16 type, unsigned int nth, unsigned int *index)
{
	unsigned int i;

	for (i = 0; i < MAX_DEVICES; i++) {
		if (descs[i].type != type)
			continue;
		if (nth-- == 0) {
			/* irq = index + 1, and there are only LGUEST_IRQS. */
			if (i + 1 >= LGUEST_IRQS)
				return NULL;
			*index = i;
			descs[i].status |= LGUEST_DEVICE_S_DRIVER;
			return &descs[i];
		}
	}
	return NULL;
}

void *device_map(struct lguest_device_desc *desc)
{
	return map_pages(desc->pfn * PAGE_SIZE, desc->num_pages);
}

void device_ready(struct lguest_device_desc *desc)
{
	desc->status |= LGUEST_DEVICE_S_DRIVER_OK;
}
