#!/usr/bin/env node
'use strict';
/*
 * s3rver with atomic object writes, for the local stack only (agentmesh devstack).
 *
 * Why: s3rver 3.x opens the object file with createWriteStream(path), which truncates it at
 * once, and then streams the request body into it. When the client dies mid-upload (a broker
 * killed with -9, exactly what our fault tests do), the object stays empty or cut short. Real
 * S3 never shows a partial PUT. Tansu keeps each partition's watermark in one small JSON
 * object, so an empty one makes that partition fail every fetch after the restart.
 *
 * This wrapper swaps two FilesystemStore methods for versions that write to a temporary file
 * and rename it into place once the body has fully arrived, then runs s3rver's own CLI with
 * the same arguments. NODE_PATH must include the node_modules that hold s3rver.
 */
const crypto = require('crypto');
const fs = require('fs-extra');
const path = require('path');
const { pick, pickBy } = require('lodash');
const FilesystemStore = require('s3rver/lib/stores/filesystem');
const S3Object = require('s3rver/lib/models/object');

function tempPath(target) {
  return `${target}.tmp-${process.pid}-${crypto.randomBytes(6).toString('hex')}`;
}

async function writeAtomic(target, data) {
  const tmp = tempPath(target);
  await fs.writeFile(tmp, data);
  await fs.rename(tmp, target);
}

function streamToFile(content, file) {
  // Resolves with [size, md5] only when the source ended normally and the file is flushed.
  return new Promise((resolve, reject) => {
    const md5 = crypto.createHash('md5');
    const out = fs.createWriteStream(file);
    let size = 0;
    let ended = false;
    const fail = err => {
      out.destroy();
      reject(err || new Error('upload aborted'));
    };
    if (Buffer.isBuffer(content)) {
      md5.update(content);
      out.on('error', fail);
      out.on('finish', () => resolve([content.length, md5.digest('hex')]));
      out.end(content);
      return;
    }
    content.on('data', chunk => {
      md5.update(chunk);
      size += chunk.length;
      if (!out.write(chunk)) {
        content.pause();
        out.once('drain', () => content.resume());
      }
    });
    content.on('end', () => {
      ended = true;
      out.end();
    });
    content.on('error', fail);
    content.on('aborted', () => fail(new Error('upload aborted')));
    content.on('close', () => {
      if (!ended) fail(new Error('upload closed before its end'));
    });
    out.on('error', fail);
    out.on('finish', () => {
      if (ended) resolve([size, md5.digest('hex')]);
    });
  });
}

FilesystemStore.prototype.putMetadata = async function putMetadata(bucket, key, metadata, md5) {
  const metadataPath = this.getResourcePath(bucket, key, 'metadata.json');
  const md5Path = this.getResourcePath(bucket, key, 'object.md5');
  const json = {
    ...pick(metadata, S3Object.ALLOWED_METADATA),
    ...pickBy(metadata, (value, k) => k.startsWith('x-amz-meta-')),
  };
  if (md5) await writeAtomic(md5Path, md5);
  await writeAtomic(metadataPath, JSON.stringify(json, null, 2));
};

FilesystemStore.prototype.putObject = async function putObject(object) {
  const objectPath = this.getResourcePath(object.bucket, object.key, 'object');
  await fs.mkdirp(path.dirname(objectPath));
  const tmp = tempPath(objectPath);
  let result;
  try {
    result = await streamToFile(object.content, tmp);
  } catch (err) {
    await fs.remove(tmp);
    throw err;
  }
  const [size, md5] = result;
  // No stale checksum may outlive the rename: s3rver recomputes a missing one on read.
  await fs.remove(`${objectPath}.md5`);
  await fs.rename(tmp, objectPath);
  await this.putMetadata(object.bucket, object.key, object.metadata, md5);
  return { size, md5 };
};

require('s3rver/bin/s3rver.js');
