"""wire.Channel.query: a JSON reply larger than MAX_MESSAGE (the STATS of a lab of hundreds of
guests) arrives whole; before, it was cut at 64 KiB and `lgnet status` died on the JSON."""
import json
import socket
import threading

from lgnet import wire


def test_a_reply_larger_than_max_message_arrives_whole(tmp_path):
    path = str(tmp_path / "broker.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)
    rows = [{"guest": i, "pid": 1000 + i, "name": "guest-%03d" % i, "tx_packets": i}
            for i in range(2000)]
    tail = json.dumps(rows).encode()
    assert len(tail) > wire.MAX_MESSAGE

    def serve():
        conn, _ = listener.accept()
        request = conn.recv(wire.MAX_MESSAGE)
        assert wire.REQUEST.unpack_from(request)[0] == wire.OP_STATS
        conn.send(wire.encode_reply(wire.Reply(0, tail=tail)))
        conn.close()
    server = threading.Thread(target=serve)
    server.start()
    channel = wire.Channel(path)
    try:
        assert json.loads(channel.query(wire.OP_STATS).tail) == rows
    finally:
        channel.close()
        server.join(5)
        listener.close()
