/*
 * net.c - the lguest_net driver (drivers/net/lguest_net.c, Linux 2.6.23).
 *
 * An lguest network is one shared page: an array of 682 six-byte MAC
 * addresses, one slot per Guest on the net (our slot is the low bits of the
 * device's features).  A zero first byte means "nobody here"; bit 0 of the
 * first byte (the multicast bit, meaningless in a unicast address) means
 * "this Guest is promiscuous: send me everything".
 *
 * There is no switch.  Each Guest binds its receive buffers at the DMA key of
 * its own slot (page address + 4 * slot) and a sender looks at the page to
 * decide who gets a copy, sending one DMA to each recipient's key.  The Host
 * copies the frame straight into the recipient's buffer and interrupts it.
 */
#include "kernel.h"

struct net_dev net_devs[MAX_NET_DEVS];
unsigned int num_net_devs;

/* Eight receive buffers of one Ethernet frame each.  A DMA piece may not
 * cross a page (the Host kills us: "bad DMA entry"), so two buffers share
 * each page, at 0 and 2048 -- in every device's ring: the ring type itself is
 * page-aligned, so the second device's ring starts on a page too.  Transmit
 * buffers are laid out the same way. */
#define FRAME_STRIDE 2048
struct rx_ring {
	u8 buf[NUM_NET_RX_BUFFERS][FRAME_STRIDE];
	struct lguest_dma dma[NUM_NET_RX_BUFFERS];
} __attribute__((aligned(PAGE_SIZE)));
static struct rx_ring rx_rings[MAX_NET_DEVS];

_Static_assert(ETH_FRAME_LEN <= FRAME_STRIDE && PAGE_SIZE % FRAME_STRIDE == 0,
	       "a frame buffer must not cross a page");
_Static_assert(sizeof(struct rx_ring) % PAGE_SIZE == 0, "every ring starts on a page");

/*
 * Transmitting.  lguest_net made one synchronous SEND_DMA per recipient and
 * looked at its used_len at once.  We queue them in the async ring instead
 * (async_hcall): a frame then costs no trip to the Host of its own, it goes
 * with our next hypercall, which is usually the HALT right after it.  So each
 * queued send has its own lguest_dma, whose used_len the Host writes when it
 * makes the call, and its frame stays put until then: TX_FRAMES buffers, used
 * in turn, and as many sends in flight as the ring has entries.  A send's
 * used_len is looked at once the Host has made it ("reaped", oldest first: the
 * ring is made in order): fewer bytes than we sent (nobody bound, or no free
 * buffer even after one retry) is what lguest_net counted as a carrier error.
 * Callers hold interrupts off.
 */
#define TX_FRAMES 8
#define TX_SENDS LHCALL_RING_SIZE
static u8 tx_frames[TX_FRAMES][FRAME_STRIDE] __attribute__((aligned(PAGE_SIZE)));
static struct tx_send {
	struct lguest_dma dma;
	struct net_dev *dev;
	unsigned int frame;
	int entry;			/* what async_hcall() answered */
} tx_sends[TX_SENDS];
static unsigned int tx_frame;		/* the frame being built */
static unsigned int tx_queued, tx_reaped;	/* sends so far: the difference is in flight */
static unsigned int tx_in_frame[TX_FRAMES];	/* sends in flight, per frame */

u8 *net_tx_buffer(void)
{
	return tx_frames[tx_frame];
}

static void tx_reap(void)
{
	while (tx_reaped != tx_queued) {
		struct tx_send *t = &tx_sends[tx_reaped % TX_SENDS];

		if (!async_done(t->entry))
			break;
		if (t->dma.used_len != t->dma.len[0])
			t->dev->tx_carrier_errors++;
		tx_in_frame[t->frame]--;
		tx_reaped++;
	}
}

/* Until "done" says so, have the Host make what we queued (it makes the whole
 * ring at each call: one is all it takes). */
static void tx_settle(int (*done)(void))
{
	tx_reap();
	while (!done()) {
		async_flush();
		tx_reap();
	}
}

static int tx_send_free(void)
{
	return tx_queued - tx_reaped < TX_SENDS;
}

static int tx_frame_free(void)
{
	return tx_in_frame[tx_frame] == 0;
}

static int tx_all_reaped(void)
{
	return tx_reaped == tx_queued;
}

/* Slot "peer" wants a frame for "dest" if its MAC (ignoring the promiscuous
 * bit) is the destination: lguest_net's mac_eq(). */
static int mac_eq(const u8 *dest, const volatile u8 *peer)
{
	unsigned int i;

	if ((peer[0] & ~NET_PROMISC_BIT) != dest[0])
		return 0;
	for (i = 1; i < ETH_ALEN; i++)
		if (peer[i] != dest[i])
			return 0;
	return 1;
}

/* Does slot i get a copy of a frame for "dest"?  lguest_net's rule: not
 * ourselves, not an unused slot; then every slot for a broadcast or multicast,
 * and for a unicast frame the slot whose MAC matches and every promiscuous
 * one. */
static int wants_frame(const struct net_dev *dev, unsigned int i, const u8 *dest)
{
	const volatile u8 *peer = dev->macs[i];

	if (i == dev->slot || peer[0] == 0)
		return 0;
	return (dest[0] & NET_PROMISC_BIT) || (peer[0] & NET_PROMISC_BIT) || mac_eq(dest, peer);
}

/* Queue one SEND_DMA of the frame being built to slot i. */
static void transmit_to(struct net_dev *dev, unsigned int i, unsigned int len)
{
	struct tx_send *t;

	tx_settle(tx_send_free);
	t = &tx_sends[tx_queued % TX_SENDS];
	t->dma.used_len = 0;
	t->dma.addr[0] = __pa(tx_frames[tx_frame]);
	t->dma.len[0] = len;
	t->dma.len[1] = 0;
	t->dev = dev;
	t->frame = tx_frame;
	tx_in_frame[tx_frame]++;
	tx_queued++;
	t->entry = async_hcall(LHCALL_SEND_DMA, dev->page_pa + NET_PEER_KEY_STRIDE * i,
			       __pa(&t->dma), 0);
}

/*
 * Transmit the frame being built: one SEND_DMA per recipient.  Like lguest_net
 * we look at every slot of the page for every frame: a peer may take any
 * slot at any time, and a promiscuous one wants our unicast frames too.
 *
 * But most of the 682 slots are empty, and under Unicorn every instruction
 * costs: the loop testing each slot in turn was 83% of a ping's guest code.
 * So we first OR together the first bytes of SCAN_GROUP slots at a time (one
 * instruction a slot) and skip a group where all are zero, that is, unused;
 * any other group gets lguest_net's test slot by slot.
 */
#define SCAN_GROUP 16
#define SCAN_GROUPS (NET_SLOTS / SCAN_GROUP)	/* whole groups; the rest slot by slot */

/* The first group from "group" on with a used slot (SCAN_GROUPS: none).  Out
 * of line, its loop has the registers to itself: gcc then ORs each first byte
 * straight from memory, one instruction a slot. */
static unsigned int __attribute__((noinline))
next_used_group(const u8 (*macs)[ETH_ALEN], unsigned int group)
{
	for (; group < SCAN_GROUPS; group++) {
		const u8 (*first)[ETH_ALEN] = macs + group * SCAN_GROUP;
		u8 any = 0;
		unsigned int k;

#pragma GCC unroll 16
		for (k = 0; k < SCAN_GROUP; k++)
			any |= first[k][0];
		if (any)
			break;
	}
	return group;
}

/* Every whole group with a used slot; the short last group is the caller's. */
#define for_each_used_group(macs, group)					\
	for (group = next_used_group(macs, 0); group < SCAN_GROUPS;		\
	     group = next_used_group(macs, group + 1))

/* Inlined, so every SEND_DMA of a frame is made from net_xmit (what --trace and
 * gdb users look for). */
static inline __attribute__((always_inline))
void xmit_slots(struct net_dev *dev, unsigned int first, unsigned int end, unsigned int len)
{
	unsigned int i;

	for (i = first; i < end; i++)
		if (wants_frame(dev, i, tx_frames[tx_frame]))
			transmit_to(dev, i, len);
}

void net_xmit(struct net_dev *dev, unsigned int len)
{
	unsigned int group;

	for_each_used_group(dev->macs, group)
		xmit_slots(dev, group * SCAN_GROUP, (group + 1) * SCAN_GROUP, len);
	xmit_slots(dev, SCAN_GROUPS * SCAN_GROUP, NET_SLOTS, len);
	dev->tx_packets++;
	tx_frame = (tx_frame + 1) % TX_FRAMES;
	tx_settle(tx_frame_free);		/* the next frame is built there */
}

/* Somebody else's key on this net, for the hostile tests: the first other
 * used slot, or else the slot after ours. */
u32 net_peer_key(struct net_dev *dev)
{
	unsigned int i;

	for (i = 0; i < NET_SLOTS; i++)
		if (i != dev->slot && dev->macs[i][0])
			return dev->page_pa + NET_PEER_KEY_STRIDE * i;
	return dev->page_pa + NET_PEER_KEY_STRIDE * ((dev->slot + 1) % NET_SLOTS);
}

/*
 * Announce ourselves: our MAC goes into our slot (with the promiscuous bit if
 * asked) only now that our receive buffers are bound and our address is set,
 * so a peer that sees it can send to us at once and get an answer.
 */
void net_publish(int promisc)
{
	unsigned int d;

	for (d = 0; d < num_net_devs; d++) {
		struct net_dev *dev = &net_devs[d];

		memcpy(dev->macs[dev->slot], dev->mac, ETH_ALEN);
		if (promisc)
			dev->macs[dev->slot][0] |= NET_PROMISC_BIT;
	}
}

static unsigned int used_slots(const struct net_dev *dev, unsigned int first,
			       unsigned int end)
{
	unsigned int i, n = 0;

	for (i = first; i < end; i++)
		if (i != dev->slot && dev->macs[i][0])
			n++;
	return n;
}

/* How many other Guests have a MAC in this net's page right now (peers= asks
 * every 10 ms: the unused groups are skipped as net_xmit skips them). */
unsigned int net_peer_count(struct net_dev *dev)
{
	unsigned int group, n = 0;

	for_each_used_group(dev->macs, group)
		n += used_slots(dev, group * SCAN_GROUP, (group + 1) * SCAN_GROUP);
	return n + used_slots(dev, SCAN_GROUPS * SCAN_GROUP, NET_SLOTS);
}

/*
 * Receiving: take every buffer the Host filled (used_len != 0), hand
 * believable frames up, and give each buffer back by clearing used_len once
 * we are done with its contents.  Called with interrupts off.
 */
static void net_rx(struct net_dev *dev, struct rx_ring *ring)
{
	unsigned int i;

	for (i = 0; i < NUM_NET_RX_BUFFERS; i++) {
		u32 len = *(volatile u32 *)&ring->dma[i].used_len;

		if (len == 0)
			continue;
		if (len < ETH_HLEN || len > ETH_FRAME_LEN) {
			dev->rx_length_errors++;
		} else {
			dev->rx_packets++;
			eth_input(dev, ring->buf[i], len);
		}
		barrier();
		ring->dma[i].used_len = 0;
	}
}

/* The receive interrupt. */
static void net_irq(unsigned int irq)
{
	unsigned int d;

	for (d = 0; d < num_net_devs; d++)
		if (net_devs[d].irq == irq)
			net_rx(&net_devs[d], &rx_rings[d]);
}

/*
 * The same work without the interrupt.  The Host can only interrupt us when
 * it has control (a hypercall, the end of a time slice) and interrupts are
 * on; a Guest busy with interrupts mostly off would otherwise let its eight
 * buffers fill up and the Host drop frames.  So whoever waits polls too (the
 * idea Linux calls NAPI).  Interrupts must be off.
 */
void net_poll(void)
{
	unsigned int d;

	for (d = 0; d < num_net_devs; d++)
		net_rx(&net_devs[d], &rx_rings[d]);
}

/*
 * Bring up every net device: our MAC is 02:00 followed by our guest id
 * (little-endian) and two zeroes, written into our slot (with the
 * promiscuous bit if asked); then the receive buffers are bound at our key.
 */
void net_init(int promisc, int csum)
{
	struct lguest_device_desc *desc;
	unsigned int nth, index, i;

	for (nth = 0; (desc = find_device(LGUEST_DEVICE_T_NET, nth, &index)); nth++) {
		struct net_dev *dev;
		struct rx_ring *ring;

		if (num_net_devs == MAX_NET_DEVS) {
			printk("net: only %u net devices supported\n", MAX_NET_DEVS);
			break;
		}
		dev = &net_devs[num_net_devs];
		ring = &rx_rings[num_net_devs];
		memset(dev, 0, sizeof(*dev));
		dev->slot = desc->features & NET_SLOT_FEATURE_MASK;
		dev->nocsum = !csum && (desc->features & LGUEST_NET_F_NOCSUM);
		dev->irq = index + 1;
		if (dev->slot >= NET_SLOTS || desc->num_pages < 1) {
			printk("net%u: bad slot %u\n", num_net_devs, dev->slot);
			desc->status |= LGUEST_DEVICE_S_FAILED;
			continue;
		}
		dev->page_pa = desc->pfn * PAGE_SIZE;
		dev->macs = device_map(desc);
		dev->mac[0] = 0x02;
		dev->mac[1] = 0x00;
		dev->mac[2] = lguest_data.guestid & 0xFF;
		dev->mac[3] = lguest_data.guestid >> 8;
		dev->mac[4] = dev->mac[5] = 0;

		for (i = 0; i < NUM_NET_RX_BUFFERS; i++) {
			memset(&ring->dma[i], 0, sizeof(ring->dma[i]));
			ring->dma[i].addr[0] = __pa(ring->buf[i]);
			ring->dma[i].len[0] = ETH_FRAME_LEN;
		}
		num_net_devs++;
		request_irq(dev->irq, net_irq);
		if (!hcall(LHCALL_BIND_DMA, dev->page_pa + NET_PEER_KEY_STRIDE * dev->slot,
			   __pa(ring->dma), (NUM_NET_RX_BUFFERS << BIND_NUM_SHIFT) | dev->irq)) {
			printk("net%u: could not bind receive buffers\n", num_net_devs - 1);
			desc->status |= LGUEST_DEVICE_S_FAILED;
			num_net_devs--;
			continue;
		}
		dev->up = 1;
		device_ready(desc);
		printk("net%u: slot %u, mac %02x:%02x:%02x:%02x:%02x:%02x%s%s\n",
		       num_net_devs - 1, dev->slot, dev->mac[0], dev->mac[1], dev->mac[2],
		       dev->mac[3], dev->mac[4], dev->mac[5], promisc ? ", promiscuous" : "",
		       dev->nocsum ? ", nocsum" : "");
	}
}

void net_report(void)
{
	unsigned int d;
	u32 flags = irq_save();

	tx_settle(tx_all_reaped);		/* every carrier error counted */
	irq_restore(flags);

	for (d = 0; d < num_net_devs; d++)
		printk("net%u: tx %u packets, rx %u packets, %u carrier errors, "
		       "%u length errors, %u checksum errors\n", d, net_devs[d].tx_packets,
		       net_devs[d].rx_packets, net_devs[d].tx_carrier_errors,
		       net_devs[d].rx_length_errors, net_devs[d].rx_csum_errors);
}
