// This browser's recent results, kept in IndexedDB (images as Blobs): at most KEEP entries.

const DB = 'klein';
const STORE = 'results';
const KEEP = 12;

function open() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE, { keyPath: 'id', autoIncrement: true });
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function done(tx) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
  });
}

// Every entry, newest first.
export async function list() {
  const db = await open();
  const req = db.transaction(STORE).objectStore(STORE).getAll();
  const all = await new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
  db.close();
  return all.reverse();
}

// Adds `entry` ({png: Blob, seed, prompt, ...}) and drops the oldest beyond KEEP.
export async function add(entry) {
  const db = await open();
  const tx = db.transaction(STORE, 'readwrite');
  const store = tx.objectStore(STORE);
  store.add({ ...entry, created: Date.now() });
  const keys = store.getAllKeys();
  keys.onsuccess = () => {
    const extra = keys.result.length - KEEP;
    for (const key of keys.result.slice(0, Math.max(0, extra))) store.delete(key);
  };
  await done(tx);
  db.close();
}

export async function clear() {
  const db = await open();
  const tx = db.transaction(STORE, 'readwrite');
  tx.objectStore(STORE).clear();
  await done(tx);
  db.close();
}
