/*
 * main.c - boot, the command line, and what this Guest does with its life.
 *
 * head.S calls start_kernel() with the physical address of the boot header
 * the Launcher wrote (a Linux boot header: E820 memory map at 0x2D0, command
 * line pointer at 0x228, initrd size at 0x21C).  We say hello, tell the Host
 * where our lguest_data is, install our interrupt handlers, find our devices,
 * and then do what the command line asks.  The command line is the
 * Launcher's arguments after the kernel, joined by spaces.  A word we do not
 * know, or a value we cannot read, stops us at boot with a CRASH naming it
 * (and the console lists the options we know): a typo such as pnig= would
 * otherwise leave a Guest serving forever instead of pinging.
 *
 *   ip=A.B.C.D[/N][,...]   address of each net device, in order (default /24)
 *   ping=A.B.C.D[,...]     ping each in turn, print statistics, power down
 *   flood=SECONDS          with ping=: for SECONDS per target, send the next
 *                          echo request as soon as the last reply is back (or
 *                          after FLOOD_WAIT_MS), print no line per reply but
 *                          one summary: "flood A.B.C.D: S sent, R received,
 *                          N replies/s, rtt avg X ms" (for `lgnet bench`)
 *   count=N                echo requests per target (default 3)
 *   interval=MS            between two requests (default 1000)
 *   timeout=MS             for ARP, and for the last replies (default 1000)
 *   peers=N                before pinging, wait (up to 10 s) until N other
 *                          Guests have a MAC on the first net
 *   linger=MS              after pinging, keep answering this long before
 *                          powering down (so slower peers get their replies)
 *   promisc                set the promiscuous bit in our net slots
 *   csum                   check ICMP and UDP checksums even on a net that
 *                          says it does not corrupt frames (NOCSUM): lgnet's
 *                          impairments can
 *   block=test             write sector 1, read sectors 0-1 back, print them
 *   poweroff               power down when done, even without ping=
 *   hostile=WHAT           misbehave, for the Host's tests: baddma, badkey,
 *                          crosspage, crash, spin or fault
 *
 * Without ping= the Guest stays up forever, answering pings and UDP echo.
 */
#include "kernel.h"

#define MAX_TARGETS 16
#define DEFAULT_PREFIX 24
#define PEERS_WAIT_MS 10000
#define PEERS_POLL_MS 10	/* how often peers= looks at the net page again */
#define FLOOD_WAIT_MS 100	/* a lost request or reply stalls a flood this long */

static char cmdline[1024];

static struct {
	u32 ip[MAX_NET_DEVS], netmask[MAX_NET_DEVS];
	unsigned int num_ips;
	u32 targets[MAX_TARGETS];
	unsigned int num_targets;
	u32 count, interval_ms, timeout_ms, peers, linger_ms, flood_s;
	int promisc, block_test, poweroff, csum;
	const char *hostile;
} opt = { .count = 3, .interval_ms = 1000, .timeout_ms = 1000 };

/* --- the command line ----------------------------------------------------- */

static u32 prefix_mask(u32 bits)
{
	return bits == 0 ? 0 : 0xFFFFFFFFu << (32 - (bits > 32 ? 32 : bits));
}

/* "A.B.C.D[/N],..." into up to max addresses (and masks, if masks); -1 if
 * something in it is not an address. */
static int parse_ip_list(const char *s, u32 *ips, u32 *masks, unsigned int max)
{
	int n = 0;

	while (*s && (unsigned int)n < max) {
		u32 ip = parse_ip(&s), bits = DEFAULT_PREFIX;

		if (masks && *s == '/') {
			s++;
			bits = parse_uint(&s);
		}
		if (!ip || (*s && *s != ','))
			return -1;
		ips[n] = ip;
		if (masks)
			masks[n] = prefix_mask(bits);
		n++;
		if (*s == ',')
			s++;
	}
	return n;
}

static int set_ips(const char *v)
{
	int n = parse_ip_list(v, opt.ip, opt.netmask, MAX_NET_DEVS);

	opt.num_ips = n < 0 ? 0 : (unsigned int)n;
	return n >= 0;
}

static int set_targets(const char *v)
{
	int n = parse_ip_list(v, opt.targets, NULL, MAX_TARGETS);

	opt.num_targets = n < 0 ? 0 : (unsigned int)n;
	return n >= 0;
}

static int set_block(const char *v)
{
	opt.block_test = 1;
	return strcmp(v, "test") == 0;
}

static int set_hostile(const char *v)
{
	opt.hostile = v;
	return 1;
}

/*
 * Every option, once: parse_cmdline() and the list in its refusal both read
 * this table.  A FLAG stands alone ("promisc"); the others are "name=value",
 * a NUMBER in decimal digits, anything else checked by its own set().
 */
static const struct cmdline_option {
	const char *name;
	enum { NUMBER, FLAG, OTHER } kind;
	void *target;			/* NUMBER: u32 *; FLAG: int * */
	int (*set)(const char *value);	/* OTHER: 0 if the value is bad */
} options[] = {
	{ "ip", OTHER, NULL, set_ips },
	{ "ping", OTHER, NULL, set_targets },
	{ "flood", NUMBER, &opt.flood_s, NULL },
	{ "count", NUMBER, &opt.count, NULL },
	{ "interval", NUMBER, &opt.interval_ms, NULL },
	{ "timeout", NUMBER, &opt.timeout_ms, NULL },
	{ "peers", NUMBER, &opt.peers, NULL },
	{ "linger", NUMBER, &opt.linger_ms, NULL },
	{ "promisc", FLAG, &opt.promisc, NULL },
	{ "csum", FLAG, &opt.csum, NULL },
	{ "block", OTHER, NULL, set_block },
	{ "poweroff", FLAG, &opt.poweroff, NULL },
	{ "hostile", OTHER, NULL, set_hostile },
};

/* Stop at boot over a word we cannot follow: the console shows what we know,
 * the CRASH reason (what `lgnet up` prints for this Guest) names the word. */
static void __attribute__((noreturn)) refuse(const char *why, const char *word)
{
	static char reason[CRASH_MESSAGE_MAX];
	unsigned int i;

	printk("lguest: %s '%s'; the options are:", why, word);
	for (i = 0; i < ARRAY_SIZE(options); i++)
		printk(" %s%s", options[i].name, options[i].kind == FLAG ? "" : "=");
	printk("\n");
	snprintf(reason, sizeof(reason), "%s '%s' on the command line", why, word);
	crash(reason);
}

static void parse_word(const char *word)
{
	const struct cmdline_option *o = NULL;
	const char *value = NULL, *v;
	size_t name_len = 0;
	unsigned int i;

	while (word[name_len] && word[name_len] != '=')
		name_len++;
	if (word[name_len] == '=')
		value = word + name_len + 1;
	for (i = 0; i < ARRAY_SIZE(options); i++)
		if (strlen(options[i].name) == name_len
		    && strncmp(word, options[i].name, name_len) == 0)
			o = &options[i];
	if (!o)
		refuse("unknown option", word);
	if (o->kind == FLAG) {
		if (value)
			refuse("this option takes no value:", word);
		*(int *)o->target = 1;
		return;
	}
	if (!value || !*value)
		refuse("this option needs a value:", word);
	if (o->kind == OTHER) {
		if (!o->set(value))
			refuse("bad value in", word);
		return;
	}
	v = value;
	*(u32 *)o->target = parse_uint(&v);
	if (*v)
		refuse("not a number in", word);
}

static void parse_cmdline(char *s)
{
	while (*s) {
		const char *word;

		while (*s == ' ')
			s++;
		word = s;
		while (*s && *s != ' ')
			s++;
		if (*s)
			*s++ = '\0';	/* each word becomes a string of its own */
		if (*word)
			parse_word(word);
	}
	if (opt.count > 0xFFFF)		/* icmp_seq is 16 bits */
		opt.count = 0xFFFF;
}

/* --- ping ----------------------------------------------------------------- */

static struct {
	u32 target;
	u32 transmitted, received;
	u64 min, max, sum;
	u32 seen[0x10000 / 32];		/* one bit per icmp_seq: duplicates */
} ping;

/* Print the replies the receive interrupt queued (called with irqs off). */
static int ping_drain(void)
{
	struct ping_reply r;
	char ms[24];

	while (ping_take_reply(&r)) {
		u32 bit = 1u << (r.seq % 32);

		if (r.from != ping.target || r.seq == 0 || r.seq > ping.transmitted
		    || (ping.seen[r.seq / 32] & bit))
			continue;
		ping.seen[r.seq / 32] |= bit;
		ping.received++;
		ping.sum += r.rtt_ns;
		if (ping.received == 1 || r.rtt_ns < ping.min)
			ping.min = r.rtt_ns;
		if (r.rtt_ns > ping.max)
			ping.max = r.rtt_ns;
		print_ms(ms, sizeof(ms), r.rtt_ns);
		printk("64 bytes from " IP_FMT ": icmp_seq=%u time=%s ms\n",
		       IP_ARGS(r.from), r.seq, ms);
	}
	return 0;
}

static int ping_all_back(void)
{
	ping_drain();
	return ping.received == ping.transmitted;
}

static void ping_one(u32 target, u16 id)
{
	struct net_dev *dev = route(target);
	u64 interval = (u64)opt.interval_ms * NSEC_PER_MSEC;
	u64 timeout = (u64)opt.timeout_ms * NSEC_PER_MSEC;
	u64 sent, avg;
	char min[24], mean[24], max[24];
	u32 seq;

	printk("PING " IP_FMT " (" IP_FMT ") 56(84) bytes of data.\n",
	       IP_ARGS(target), IP_ARGS(target));
	if (!dev) {
		printk("connect: Network is unreachable (no ip= for a net device)\n");
		return;
	}
	memset(&ping, 0, sizeof(ping));
	ping.target = target;
	arp_resolve(dev, target, timeout);

	/* Like ping(8), the next request goes an interval after this one: a
	 * Guest that was held up does not catch up with a burst. */
	for (seq = 1; seq <= opt.count; seq++) {
		sent = now_ns();
		ping_send(dev, target, id, seq);
		ping.transmitted++;
		if (seq < opt.count)
			wait_until(sent + interval, ping_drain);
	}
	wait_until(now_ns() + timeout, ping_all_back);

	printk("--- " IP_FMT " ping statistics ---\n", IP_ARGS(target));
	printk("%u packets transmitted, %u received, %u%% packet loss\n",
	       ping.transmitted, ping.received,
	       ping.transmitted ? (ping.transmitted - ping.received) * 100 / ping.transmitted : 0);
	if (ping.received) {
		avg = ping.sum;
		do_div(&avg, ping.received);
		print_ms(min, sizeof(min), ping.min);
		print_ms(mean, sizeof(mean), avg);
		print_ms(max, sizeof(max), ping.max);
		printk("rtt min/avg/max = %s/%s/%s ms\n", min, mean, max);
	}
}

/* --- flood= -------------------------------------------------------------- */

/*
 * One request in flight at a time, so the rate is round trips per second and
 * the RTT is not inflated by queueing.  icmp_seq wraps at 16 bits; only the
 * reply to the request in flight counts, so a late reply to an older one
 * (after FLOOD_WAIT_MS) is neither counted twice nor taken for the new one.
 */
static struct {
	u16 seq;			/* in flight, 0 when answered */
	u32 sent, received;
	u64 sum;
} flood;

static int flood_answered(void)
{
	struct ping_reply r;

	while (ping_take_reply(&r)) {
		if (r.from != ping.target || !flood.seq || r.seq != flood.seq)
			continue;
		flood.seq = 0;
		flood.received++;
		flood.sum += r.rtt_ns;
	}
	return flood.seq == 0;
}

static void flood_one(u32 target, u16 id)
{
	struct net_dev *dev = route(target);
	u64 start, end, sent, avg, us, rate;
	u16 seq = 0;
	char mean[24];

	if (!dev) {
		printk("flood " IP_FMT ": Network is unreachable\n", IP_ARGS(target));
		return;
	}
	memset(&flood, 0, sizeof(flood));
	ping.target = target;
	arp_resolve(dev, target, (u64)opt.timeout_ms * NSEC_PER_MSEC);
	start = now_ns();
	end = start + (u64)opt.flood_s * NSEC_PER_SEC;
	for (sent = start; sent < end; sent = now_ns()) {
		seq = seq == 0xFFFF ? 1 : seq + 1;
		flood.seq = seq;
		ping_send(dev, target, id, seq);
		flood.sent++;
		wait_until(sent + (u64)FLOOD_WAIT_MS * NSEC_PER_MSEC, flood_answered);
	}
	/* Rates in integers (no FPU here): replies per second from microseconds. */
	us = now_ns() - start;
	do_div(&us, 1000);
	rate = (u64)flood.received * 1000000;
	if (us)
		do_div(&rate, (u32)us);
	avg = flood.sum;
	if (flood.received)
		do_div(&avg, flood.received);
	print_ms(mean, sizeof(mean), avg);
	printk("flood " IP_FMT ": %u sent, %u received, %u replies/s, rtt avg %s ms\n",
	       IP_ARGS(target), flood.sent, flood.received, (u32)rate, mean);
}

/* --- peers= and linger= -------------------------------------------------- */

static int enough_peers(void)
{
	return net_peer_count(&net_devs[0]) >= opt.peers;
}

/* Nothing tells a Guest that a MAC appeared in the page (lguest's Guests had
 * no such notice either), and a peer that boots beside us sends us nothing:
 * so look again every PEERS_POLL_MS rather than sleep the whole wait away. */
static void wait_for_peers(void)
{
	u64 deadline = now_ns() + (u64)PEERS_WAIT_MS * NSEC_PER_MSEC;

	while (!enough_peers() && now_ns() < deadline) {
		u64 next = now_ns() + (u64)PEERS_POLL_MS * NSEC_PER_MSEC;

		wait_until(next < deadline ? next : deadline, enough_peers);
	}
}

static int never(void)
{
	return 0;
}

/* --- block=test ----------------------------------------------------------- */

static char block_out[SECTOR_SIZE] __attribute__((aligned(SECTOR_SIZE)));
static char block_in[2 * SECTOR_SIZE] __attribute__((aligned(2 * SECTOR_SIZE)));

static void show_sector(unsigned int n, const char *data)
{
	char text[65];
	unsigned int i;

	for (i = 0; i < sizeof(text) - 1 && data[i]; i++)
		text[i] = data[i] >= ' ' && data[i] < 127 ? data[i] : '.';
	text[i] = '\0';
	printk("block: sector %u: %s\n", n, text);
}

static void block_test(void)
{
	if (!block_sectors()) {
		printk("block: no block device\n");
		return;
	}
	memset(block_out, 0, sizeof(block_out));
	snprintf(block_out, sizeof(block_out), "lgnet block test: sector 1 written by guest %u",
		 lguest_data.guestid);
	if (block_io(1, 1, block_out, sizeof(block_out)) != 0)
		printk("block: write of sector 1 failed\n");
	if (block_io(0, 0, block_in, sizeof(block_in)) != 0) {
		printk("block: read of sectors 0-1 failed\n");
		return;
	}
	show_sector(0, block_in);
	show_sector(1, block_in + SECTOR_SIZE);
	printk("block: test %s\n",
	       memcmp(block_in + SECTOR_SIZE, block_out, SECTOR_SIZE) ? "FAILED" : "passed");
}

/* --- hostile=... ---------------------------------------------------------- */

/*
 * Each of these breaks one of the Host's rules; the Host should kill us (only
 * us) with a reason.  The DMA ones need somebody's key: the first other Guest
 * on our first net, or, without a net, the console key (then it is our own
 * Launcher that must refuse the addresses).
 */
static void hostile(const char *what)
{
	static struct lguest_dma dma;
	struct net_dev *dev = num_net_devs ? &net_devs[0] : NULL;
	u32 key = dev ? net_peer_key(dev) : LGUEST_CONSOLE_DMA_KEY;

	printk("hostile: %s\n", what);
	memset(&dma, 0, sizeof(dma));
	if (strcmp(what, "crash") == 0) {
		crash("hostile guest");
	} else if (strcmp(what, "spin") == 0) {
		for (;;)
			barrier();
	} else if (strcmp(what, "fault") == 0) {
		printk("hostile: read %#x\n", *(volatile u32 *)0x1000);
		return;
	} else if (strcmp(what, "baddma") == 0) {
		/* Beyond the top of memory, and longer than a page. */
		dma.addr[0] = 0xFFFFF000;
		dma.len[0] = 0x2000;
	} else if (strcmp(what, "badkey") == 0) {
		/* Keys are u32 addresses: they must be 4-byte aligned. */
		dma.addr[0] = __pa(net_tx_buffer());
		dma.len[0] = 64;
		key += 1;
	} else if (strcmp(what, "crosspage") == 0) {
		/* A piece may not cross a page boundary. */
		dma.addr[0] = (__pa(net_tx_buffer()) & ~(PAGE_SIZE - 1)) + PAGE_SIZE - 32;
		dma.len[0] = 64;
	} else {
		printk("hostile: unknown, ignored\n");
		return;
	}
	hcall(LHCALL_SEND_DMA, key, __pa(&dma), 0);
	printk("hostile: %s: still alive (used_len %u)\n", what, dma.used_len);
}

/* --- boot ----------------------------------------------------------------- */

void __attribute__((noreturn)) start_kernel(u32 boot_pa);

void start_kernel(u32 boot_pa)
{
	const u8 *boot = __va(boot_pa);
	u32 e820_size_high, cmdline_pa, initrd_size, i;

	lguest_init();
	printk("lguest: booting\n");
	idt_init();

	/* Our memory: the first (only) E820 entry, {u64 addr, u64 size, u32 type}. */
	ram_size = *(const u32 *)(boot + BOOT_E820_MAP + 8);
	e820_size_high = *(const u32 *)(boot + BOOT_E820_MAP + 12);
	if (boot[BOOT_E820_COUNT] < 1 || *(const u32 *)(boot + BOOT_E820_MAP + 16) != E820_RAM)
		crash("no E820 memory map in the boot header");
	if (e820_size_high || ram_size > MAX_RAM)
		crash("too much memory: the device window would overlap RAM");

	/* The command line, copied out of the boot page before we use it. */
	cmdline_pa = *(const u32 *)(boot + BOOT_CMDLINE_PTR);
	if (cmdline_pa && cmdline_pa < ram_size) {
		const char *s = __va(cmdline_pa);

		for (i = 0; i < sizeof(cmdline) - 1 && cmdline_pa + i < ram_size && s[i]; i++)
			cmdline[i] = s[i];
	}
	printk("lguest: %u MiB of RAM, guest id %u, command line: %s\n",
	       ram_size >> 20, lguest_data.guestid, cmdline);
	parse_cmdline(cmdline);

	/* The Launcher's page directory sits one page below the initrd. */
	initrd_size = *(const u32 *)(boot + BOOT_INITRD_SIZE);
	devices_init(ram_size - initrd_size - PAGE_SIZE);
	console_init();
	net_init(opt.promisc, opt.csum);
	for (i = 0; i < num_net_devs && i < opt.num_ips; i++) {
		net_devs[i].ip = opt.ip[i];
		net_devs[i].netmask = opt.netmask[i];
		printk("net%u: ip " IP_FMT " netmask " IP_FMT "\n", i,
		       IP_ARGS(opt.ip[i]), IP_ARGS(opt.netmask[i]));
	}
	net_publish(opt.promisc);
	if (opt.num_targets && !num_net_devs)
		crash("ping= needs a net device, and this guest has none");
	block_init();
	irq_enable();
	printk("lguest: ready\n");

	if (opt.block_test)
		block_test();
	if (opt.hostile)
		hostile(opt.hostile);
	if (opt.peers && num_net_devs)
		wait_for_peers();
	if (opt.num_targets || opt.poweroff) {
		for (i = 0; i < opt.num_targets; i++) {
			u16 id = 0x4C00 | (lguest_data.guestid & 0xFF);

			if (opt.flood_s)
				flood_one(opt.targets[i], id);
			else
				ping_one(opt.targets[i], id);
		}
		wait_until(now_ns() + (u64)opt.linger_ms * NSEC_PER_MSEC, never);
		net_report();
		arp_report();
		crash(MSG_POWER_DOWN);
	}
	/* Nothing left to do but answer: sleep until each interrupt. */
	for (;;)
		lguest_halt();
}
