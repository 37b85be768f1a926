use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_util::{FutureExt, Sink, SinkExt, Stream};
use tokio_stream::StreamExt;
use tokio_util::codec::Framed;

use crate::framed::AsyncReadWrite;

use super::mqttbytes::v5::Packet;
use super::{mqttbytes, Codec, Incoming, MqttState, StateError};

/// Read buffer of a connection (meshbridge patch: upstream uses tokio-util's default, 8 KiB,
/// so a burst of 1 KiB publishes takes a read syscall per ~8 packets).
const READ_CAPACITY: usize = 64 * 1024;
/// Most packets handled per bulk read before the event loop flushes the replies (meshbridge
/// patch: upstream 10).
const MAX_READB_COUNT: usize = 64;

/// Network transforms packets <-> frames efficiently. It takes
/// advantage of pre-allocation, buffering and vectorization when
/// appropriate to achieve performance
pub struct Network {
    /// Frame MQTT packets from network connection
    framed: Framed<Box<dyn AsyncReadWrite>, Codec>,
    /// Maximum readv count
    max_readb_count: usize,
}
impl Network {
    pub fn new(socket: impl AsyncReadWrite + 'static, max_incoming_size: Option<u32>) -> Network {
        let socket = Box::new(socket) as Box<dyn AsyncReadWrite>;
        let codec = Codec {
            max_incoming_size,
            max_outgoing_size: None,
        };
        let framed = Framed::with_capacity(socket, codec, READ_CAPACITY);

        Network {
            framed,
            max_readb_count: MAX_READB_COUNT,
        }
    }

    pub fn set_max_outgoing_size(&mut self, max_outgoing_size: Option<u32>) {
        self.framed.codec_mut().max_outgoing_size = max_outgoing_size;
    }

    /// Reads and returns a single packet from network
    pub async fn read(&mut self) -> Result<Incoming, StateError> {
        match self.framed.next().await {
            Some(Ok(packet)) => Ok(packet),
            Some(Err(mqttbytes::Error::InsufficientBytes(_))) => unreachable!(),
            Some(Err(e)) => Err(StateError::Deserialization(e)),
            None => Err(StateError::ConnectionAborted),
        }
    }

    /// Read packets in bulk. This allow replies to be in bulk. This method is used
    /// after the connection is established to read a bunch of incoming packets
    pub async fn readb(&mut self, state: &mut MqttState) -> Result<(), StateError> {
        // wait for the first read
        let mut res = self.framed.next().await;
        let mut count = 1;
        loop {
            match res {
                Some(Ok(packet)) => {
                    if let Some(outgoing) = state.handle_incoming_packet(packet)? {
                        self.write(outgoing).await?;
                    }

                    count += 1;
                    if count >= self.max_readb_count {
                        break;
                    }
                }
                Some(Err(mqttbytes::Error::InsufficientBytes(_))) => unreachable!(),
                Some(Err(e)) => return Err(StateError::Deserialization(e)),
                None => return Err(StateError::ConnectionAborted),
            }
            // do not wait for subsequent reads
            match self.framed.next().now_or_never() {
                Some(r) => res = r,
                _ => break,
            };
        }

        Ok(())
    }

    /// Serializes packet into write buffer
    pub async fn write(&mut self, packet: Packet) -> Result<(), StateError> {
        self.framed
            .feed(packet)
            .await
            .map_err(StateError::Deserialization)
    }

    /// meshbridge patch: the next packet, for a caller that polls the connection itself
    /// (cancel-safe: a partial packet stays in the read buffer).
    pub fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<Incoming, StateError>> {
        Poll::Ready(match ready!(Pin::new(&mut self.framed).poll_next(cx)) {
            Some(Ok(packet)) => Ok(packet),
            Some(Err(mqttbytes::Error::InsufficientBytes(_))) => unreachable!(),
            Some(Err(e)) => Err(StateError::Deserialization(e)),
            None => Err(StateError::ConnectionAborted),
        })
    }

    /// meshbridge patch: serializes `packet` into the write buffer without waiting (the buffer
    /// grows; [`Network::poll_flush`] writes it out).
    pub fn feed_now(&mut self, packet: Packet) -> Result<(), StateError> {
        Pin::new(&mut self.framed)
            .start_send(packet)
            .map_err(StateError::Deserialization)
    }

    /// meshbridge patch: writes the write buffer out (cancel-safe: what is not written stays).
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StateError>> {
        Pin::new(&mut self.framed)
            .poll_flush(cx)
            .map_err(StateError::Deserialization)
    }

    /// meshbridge patch: the write buffer holds bytes not written yet.
    pub fn unflushed(&self) -> bool {
        !self.framed.write_buffer().is_empty()
    }

    pub async fn flush(&mut self) -> Result<(), StateError> {
        self.framed
            .flush()
            .await
            .map_err(StateError::Deserialization)
    }
}
