//! The reactor's slab of connections, behind accessors that cannot panic and that tell an open
//! WebSocket from one that is closing or dead.
//!
//! Slab keys are reused once a dead connection is removed at the end of a turn, so everything
//! that outlives a turn (a Redis publish acknowledgement) names a connection by key and serial.
//! Pub/sub code reaches connections only through [`Connections::open`]: a connection that has
//! started closing cannot subscribe, publish or be delivered to, by construction.

use slab::Slab;

use crate::connection::Connection;

#[derive(Default)]
pub struct Connections {
    slab: Slab<Connection>,
    /// Keys of connections killed this turn, removed at its end.
    dead: Vec<usize>,
}

impl Connections {
    /// The key the next inserted connection gets (to register its socket under).
    pub fn vacant_key(&self) -> usize {
        self.slab.vacant_key()
    }

    pub fn insert(&mut self, conn: Connection) -> usize {
        self.slab.insert(conn)
    }

    /// An open WebSocket.
    #[inline]
    pub fn open(&mut self, key: usize) -> Option<&mut Connection> {
        self.slab.get_mut(key).filter(|c| c.is_open())
    }

    /// An open WebSocket that is still the connection `serial` named (not a later one that
    /// reuses its key).
    pub fn open_with_serial(&mut self, key: usize, serial: u64) -> Option<&mut Connection> {
        self.open(key).filter(|c| c.serial() == serial)
    }

    /// Any connection not yet dead (the I/O loop reads and flushes every phase).
    #[inline]
    pub fn live(&mut self, key: usize) -> Option<&mut Connection> {
        self.slab.get_mut(key).filter(|c| !c.is_dead())
    }

    pub fn get(&self, key: usize) -> Option<&Connection> {
        self.slab.get(key)
    }

    /// Notes a connection killed this turn; its slot is freed by [`Connections::remove_dead`].
    pub fn buried(&mut self, key: usize) {
        self.dead.push(key);
    }

    /// Frees the slots of connections killed this turn.
    pub fn remove_dead(&mut self) {
        for key in self.dead.drain(..) {
            if self.slab.get(key).is_some_and(Connection::is_dead) {
                self.slab.remove(key);
            }
        }
    }

    /// Connections in the slab, dead ones included until the end of the turn.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// Connections not yet dead.
    pub fn live_count(&self) -> usize {
        self.slab.len() - self.dead.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (usize, &Connection)> {
        self.slab.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (usize, &mut Connection)> {
        self.slab.iter_mut()
    }
}
